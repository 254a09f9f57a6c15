"""Data-parallel training on the CPU: 2 processes (gloo) under torchrun match one process with the same
effective batch, each rank reads its own shard, and only rank 0 writes the output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def losses(out: Path) -> list[float]:
    """Per-step training losses from the last checkpoint's trainer state."""
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def test_torchrun_two_processes_matches_single_process(tiny_model_dir, tmp_path):
    # identical examples make every grouping of them the same batch, so the two runs see the same data
    # per optimizer step whatever the samplers do; a rank that read all the data instead of its shard
    # would take twice the steps per epoch.
    row = {"instruction": "桜について一言で。", "input": "", "output": "春に咲く花です。", "category": "open_qa"}
    data = tmp_path / "same.jsonl"
    data.write_text((json.dumps(row, ensure_ascii=False) + "\n") * 32, encoding="utf-8")
    common = [
        str(REPO / "finetune.py"), f"--base_model={tiny_model_dir('elyza-llama2')}", f"--data_path={data}",
        "--batch_size=8", "--micro_batch_size=4", "--num_epochs=2", "--learning_rate=1e-2", "--val_set_size=0",
        "--logging_steps=1", "--lora_dropout=0", "--lora_target_modules=all-linear",
    ]  # fmt: skip
    single = subprocess.run(
        [sys.executable, *common, f"--output_dir={tmp_path / 'single'}"], capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", *common,
         f"--output_dir={tmp_path / 'ddp'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    one, two = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(one) == len(two) == 8  # 32 examples / batch 8 * 2 epochs, in both
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4, (one, two)
    assert one[-1] < one[0]
    record = json.loads((tmp_path / "ddp" / "jalora.json").read_text(encoding="utf-8"))
    assert record["data"]["train_examples"] == 32 and record["metrics"]["steps"] == 8
    # rank 1 wrote nothing of its own: one adapter, no stray temporary folders
    assert not list((tmp_path / "ddp").glob(".saving-*"))


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {
        p.stem: load_config_from_file(str(p)).distributed_type.value
        for p in (REPO / "configs/accelerate").glob("*.yaml")
    }
    assert kinds == {
        "ddp": "MULTI_GPU",
        "deepspeed_zero2": "DEEPSPEED",
        "deepspeed_zero3": "DEEPSPEED",
        "fsdp_qlora": "FSDP",
        "fsdp2_qlora": "FSDP",
    }
