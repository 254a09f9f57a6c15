"""FSDP2, FSDP1 and DeepSpeed ZeRO-2/3 on the CPU, 2 processes (gloo), on the model as jalora builds it
(tests/engine_parity.py does the run), against the single-process full-batch run; and the check
that stops a launch whose engine accelerate would not enable, before any weights load."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jalora.errors import UserError
from jalora.train.distributed import check_engine_enabled, expected_distributed_type

WORKER = Path(__file__).resolve().parent / "engine_parity.py"
PRESET = "elyza-llama2"  # preset targets q_proj, k_proj, v_proj, o_proj
QUANTIZATIONS = ("none", "4bit")
TOLERANCE = 1e-5


def run_worker(engine: str, model: Path, out: Path, port: int) -> None:
    launch = [sys.executable] if engine == "none" else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"
    ]  # fmt: skip
    done = subprocess.run(
        [*launch, str(WORKER), f"--engine={engine}", f"--model={model}", f"--preset={PRESET}", f"--out={out}"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def results(out: Path, quantization: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    folder = out / quantization
    return json.loads((folder / "result.json").read_text()), load_file(folder / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    model = tiny_model_dir(PRESET)
    out = tmp_path_factory.mktemp("reference")
    run_worker("none", model, out, 0)
    return model, {q: results(out, q) for q in QUANTIZATIONS}


def deepspeed_missing() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install deepspeed)"
    return None


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "port"), [("fsdp2", 29621), ("fsdp1", 29622), ("zero2", 29623), ("zero3", 29624)])
def test_engine_matches_single_process(engine, port, reference, tmp_path):
    if engine.startswith("zero") and (why := deepspeed_missing()):
        pytest.skip(why)
    model, expected = reference
    run_worker(engine, model, tmp_path, port)
    for quantization in QUANTIZATIONS:
        (got, adapter), (want, want_adapter) = results(tmp_path, quantization), expected[quantization]
        assert got["world_size"] == 2 and want["world_size"] == 1
        steps = list(zip(got["losses"], want["losses"], strict=True))
        assert max(abs(a - b) for a, b in steps) < TOLERANCE, (quantization, steps)
        assert want["losses"][-1] < want["losses"][0]  # the steps did train
        # each rank holds about half of what the engine shards (ZeRO-2: the trainable weights' fp32 state)
        assert len(got["shard_fractions"]) == 2 and all(0.45 <= f <= 0.55 for f in got["shard_fractions"])
        assert got["base_changed"] == [] and got["base_missing"] == []
        assert adapter.keys() == want_adapter.keys() and len(adapter) == 2 * 4 * 2  # A and B, 4 targets, 2 layers
        assert max((adapter[k] - want_adapter[k]).abs().max().item() for k in adapter) < TOLERANCE
        assert all(adapter[k].abs().max() > 0 for k in adapter if "lora_B" in k)
        if engine.startswith("fsdp"):  # settings of the shipped YAML that cannot run on CPU were overridden, and said
            assert "ACCELERATE_MIXED_PRECISION" in got["cpu_overrides"]


NO_GPU_FSDP = {"ACCELERATE_USE_FSDP": "true", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}


@pytest.mark.parametrize(
    ("env", "gpu", "running"),
    [
        (NO_GPU_FSDP, False, "MULTI_CPU"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, True, "DEEPSPEED"),
        ({"ACCELERATE_USE_FSDP": "true", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, True, "FSDP"),
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, True, "MULTI_GPU"),
        ({"WORLD_SIZE": "2"}, True, "NO"),
        ({"ACCELERATE_USE_FSDP": "true"}, True, "NO"),
        ({}, False, "NO"),
    ],
)
def test_expected_distributed_type_follows_accelerate(env, gpu, running):
    assert expected_distributed_type(env, gpu) == running


def test_engine_check_messages():
    with pytest.raises(UserError) as err:
        check_engine_enabled(NO_GPU_FSDP, gpu=False)
    message = str(err.value)
    assert "asked for FSDP" in message and "MULTI_CPU" in message and "no GPU" in message and "\n" not in message
    with pytest.raises(UserError) as err:
        check_engine_enabled({"ACCELERATE_USE_DEEPSPEED": "true"}, gpu=True)
    assert "asked for DeepSpeed" in str(err.value) and "LOCAL_RANK" in str(err.value)
    with pytest.raises(UserError) as err:
        check_engine_enabled({"WORLD_SIZE": "4"}, gpu=True)
    assert "each of the 4 processes training alone" in str(err.value)
    with pytest.raises(SystemExit) as exit_info:  # rank 1 leaves the one line to rank 0
        check_engine_enabled(NO_GPU_FSDP | {"RANK": "1"}, gpu=False)
    assert exit_info.value.code == 2
    for fine in ({}, {"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, {"ACCELERATE_USE_FSDP": "true", "LOCAL_RANK": "0"}):
        check_engine_enabled(fine, gpu=True)
    check_engine_enabled({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, gpu=False)  # torchrun on CPUs: DDP with gloo


def test_finetune_stops_before_loading_weights(monkeypatch, capsys, tmp_path):
    """An FSDP launch without a GPU: one line, exit 2, before the (missing) model is even looked at."""
    from jalora.train.finetune import finetune

    for name, value in NO_GPU_FSDP.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        finetune(base_model=str(tmp_path / "no-such-model"), output_dir=str(tmp_path / "out"))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith("error: the launch asked for FSDP") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
