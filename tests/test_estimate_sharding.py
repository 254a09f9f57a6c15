"""`jalora estimate --num_gpus N --sharding ddp|fsdp|zero3`: the engines' rules applied to the
single-GPU breakdown, and the 70B / 13B / 8B rows README's Multi-GPU table shows (predictions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jalora.cli import main
from jalora.evaluate.memory import GB, estimate_memory, sharded_memory
from jalora.model.loading import load_config, resolve_source

CONFIGS = Path(__file__).resolve().parent.parent / "bench" / "model_configs"
TABLE = {"cutoff_len": 1024, "micro_batch_size": 1, "lora_target_modules": "all-linear"}


def config(name: str):
    return load_config(resolve_source(str(CONFIGS / name)))


def per_gpu_gb(name: str, gpus: int, sharding: str) -> float:
    return sharded_memory(config(name), gpus, sharding, "4bit", **TABLE)["total"] / GB + 0.5


def test_sharding_divides_weights_and_optimizer_not_activations():
    swallow = config("llama3.1-swallow-70b")
    two = sharded_memory(swallow, 2, "fsdp", "4bit", **TABLE)
    four = sharded_memory(swallow, 4, "fsdp", "4bit", **TABLE)
    assert two["weights"] == pytest.approx(2 * four["weights"])
    assert two["lora_and_optimizer"] == pytest.approx(2 * four["lora_and_optimizer"])
    assert two["activations"] == four["activations"] and two["logits"] == four["logits"]
    assert two["all_gather"] == four["all_gather"] > 4 * GB  # embeddings and head (bf16) stay gathered under FSDP
    assert four["parameters"] == pytest.approx(70.55e9, rel=0.002)  # Llama-3.1-70B's published 70.6B
    ddp = sharded_memory(swallow, 2, "ddp", "4bit", **TABLE)
    single = estimate_memory(swallow, "4bit", chunked_ce=False, **TABLE)
    assert ddp["weights"] == single["weights"] and ddp["all_gather"] == 0
    assert not ddp["chunked_ce"]  # more than one process: jalora turns the chunked loss off


def test_the_multi_gpu_table():
    """The rows of README's Multi-GPU section: 4-bit, micro-batch 1 × 1024, all linears, 24 GB cards."""
    assert per_gpu_gb("llama3.1-swallow-70b", 2, "fsdp") > 24  # two 24 GB cards: not without offloading
    assert per_gpu_gb("llama3.1-swallow-70b", 4, "fsdp") < 24
    assert per_gpu_gb("llama3.1-swallow-70b", 4, "zero3") < 24
    assert per_gpu_gb("llm-jp-3-13b", 2, "fsdp") < per_gpu_gb("llm-jp-3-13b", 2, "ddp") < 24
    assert per_gpu_gb("llama3-elyza-jp-8b", 2, "ddp") < 24


def estimate_cli(*args: str) -> None:
    main(["estimate", *args])


def test_estimate_cli_per_gpu(capsys):
    model = str(CONFIGS / "llama3.1-swallow-70b")
    estimate_cli(model, "--num_gpus", "4", "--sharding", "fsdp", "--micro_batch_size", "1", "--cutoff_len", "1024")
    out = capsys.readouterr().out
    assert "fsdp across 4 GPUs, per GPU" in out and "all-gather buffer" in out
    assert "fits on each of 4 24 GB cards" in out and "not a measurement" in out
    with pytest.raises(SystemExit) as exit_info:
        estimate_cli(model, "--num_gpus", "2", "--sharding", "zero4")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: unknown --sharding 'zero4'; choose one of: ddp, fsdp, zero3"
