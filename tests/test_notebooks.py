"""The demo notebooks run top to bottom (on a tiny stand-in picked through JALORA_NOTEBOOK_MODEL),
so they never rot: 01 trains and saves an adapter, 02 loads it and generates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def execute(name: str, cwd: Path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def outputs(notebook) -> list[dict]:
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]


@pytest.fixture
def notebook_env(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("JALORA_NOTEBOOK_MODEL", str(tiny_model_dir("open-calm")))
    monkeypatch.setenv("JALORA_NOTEBOOK_STEPS", "3")
    monkeypatch.setenv("JALORA_NOTEBOOK_TOKENS", "8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def test_notebooks_run_top_to_bottom(notebook_env, tmp_path):
    finetune = execute("01_finetune.ipynb", tmp_path)
    adapter = tmp_path / "lora-notebook"
    record = json.loads((adapter / "jalora.json").read_text(encoding="utf-8"))
    assert record["quantization"] == "4bit" and record["metrics"]["steps"] == 3
    assert record["metrics"]["eval_loss"] < record["metrics"]["eval_loss_before"]
    assert (adapter / "loss.png").is_file()
    images = [out for out in outputs(finetune) if "image/png" in out.get("data", {})]
    assert len(images) == 2  # token-length histogram and the inline loss curve

    generate = execute("02_generate.ipynb", tmp_path)
    html = "".join(out.get("data", {}).get("text/html", "") for out in outputs(generate))
    assert "no_repeat_ngram_size=3" in html and "adapter" in html
    assert not [out for out in outputs(generate) if out.output_type == "error"]
