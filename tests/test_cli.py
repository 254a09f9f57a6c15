"""finetune.py and generate.py as a user runs them: subprocesses, from a folder outside the repo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ANSWER = "はい、承知しました。"


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def toy_records(n: int) -> list[dict]:
    topics = ["東京", "富士山", "寿司", "新幹線", "桜", "京都", "将棋", "温泉", "俳句", "味噌汁", "相撲", "紅葉"]
    return [
        {
            "index": str(i),
            "instruction": f"{topics[i % len(topics)]}について教えて。",
            "input": "",
            "output": ANSWER,
            "category": "open_qa",
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("family", ["open-calm", "elyza-llama2"])
def test_toy_task_trained_by_finetune_is_reproduced_by_generate(tiny_model_dir, tmp_path, family):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in toy_records(24)), encoding="utf-8")
    out = tmp_path / "adapter"
    trained = run(
        "finetune.py",
        f"--base_model={tiny_model_dir(family)}", f"--data_path={data}", f"--output_dir={out}",
        "--batch_size=8", "--micro_batch_size=8", "--max_steps=150", "--learning_rate=2e-2",
        "--val_set_size=0", "--lora_target_modules=all-linear", "--lora_r=16", "--lora_dropout=0",
        cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    record = json.loads((out / "jalora.json").read_text(encoding="utf-8"))
    assert record["preset"] == family and record["data"]["train_examples"] == 24

    max_new = 40
    generated = run(
        "generate.py", f"--lora_weights={out}", "--prompt=温泉について教えて。", f"--max_new_tokens={max_new}",
        cwd=tmp_path,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.strip() == ANSWER


def test_generate_answers_a_batch_file(tiny_model_dir, tmp_path):
    """--data_path/--output_file keeps every field and adds `response`; works on the base model alone."""
    records = toy_records(3)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    done = run(
        "generate.py", f"--base_model={tiny_model_dir('open-calm')}", f"--data_path={src}",
        f"--output_file={tmp_path / 'out.jsonl'}", "--max_new_tokens=5", "--batch_size=2",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [{k: v for k, v in r.items() if k != "response"} for r in rows] == records
    assert all(isinstance(r["response"], str) for r in rows)


def test_malformed_record_stops_before_training_with_one_clear_line(tiny_model_dir, tmp_path):
    lines = [json.dumps(r, ensure_ascii=False) for r in toy_records(3)]
    lines[1] = json.dumps({"index": "1", "instruction": "質問", "input": "", "category": "open_qa"})
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    done = run(
        "finetune.py", f"--base_model={tiny_model_dir('open-calm')}", f"--data_path={data}",
        f"--output_dir={tmp_path / 'out'}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"{data}:2: field 'output' is missing" in done.stderr
    assert not (tmp_path / "out").exists()


def test_sampling_flags_without_sampling_are_an_error(tiny_model_dir, tmp_path):
    done = run(
        "generate.py", f"--base_model={tiny_model_dir('open-calm')}", "--prompt=こんにちは", "--top_p=0.5",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--top_p" in done.stderr and "--do_sample" in done.stderr
