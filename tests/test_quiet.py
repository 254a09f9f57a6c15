"""A default run prints jalora's lines and its own progress bars only; --verbose brings the
libraries' output back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# what jalora itself writes to stderr in a default run: its bars and the base-model line
OWN_STDERR = ("training:", "evaluating:", "base model ")


def jalora(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", "from jalora.cli import main; main()", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def foreign_lines(stderr: str) -> list[str]:
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr)  # tqdm moves the cursor between its bars
    lines = (line.strip() for line in re.split(r"[\r\n]", plain))
    return [line for line in lines if line and not line.startswith(OWN_STDERR)]


def test_default_run_is_quiet_and_verbose_is_not(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("qwen2.5"))
    adapter = tmp_path / "adapter"
    trained = jalora(
        "finetune",
        f"--base_model={model}",
        f"--output_dir={adapter}",
        "--max_steps=2",
        "--batch_size=2",
        "--micro_batch_size=2",
        "--val_set_size=2",
        "--eval_steps=2",
        "--logging_steps=1",
        "--gradient_checkpointing=True",  # transformers warns (FutureWarning) about this flag's name
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "Warning" not in trained.stderr and foreign_lines(trained.stderr) == []
    assert "{'loss'" not in trained.stdout + trained.stderr  # no raw log dicts between bars
    assert re.search(r"training: 100%.*loss=[\d.]+, tok/s=\d+", trained.stderr)

    answered = jalora("generate", f"--lora_weights={adapter}", "--prompt=日本の首都は？", "--max_new_tokens=4",
                      "--verbose", cwd=tmp_path)  # fmt: skip
    assert answered.returncode == 0, answered.stderr[-2000:]
    assert "Loading weights" in answered.stderr  # transformers' own bar, hidden by default
