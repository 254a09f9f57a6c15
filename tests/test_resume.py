"""Training you can trust: a run killed with SIGKILL, or stopped with Ctrl-C or SIGTERM, and resumed ends
with the same adapter as an uninterrupted run; checkpoints are whole or absent; a NaN loss
stops the run at the right step with the last good checkpoint kept; output dirs are not
silently overwritten or silently resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jalora.errors import UserError
from jalora.outputs import (
    CHECKPOINT_INFO,
    WriteFailed,
    clear_previous_run,
    complete_checkpoints,
    prepare_output_dir,
    save_pretrained_atomic,
    write_json,
)
from jalora.train.finetune import finetune as finetune_cli
from jalora.train.nan_guard import NonFiniteLossError

finetune = finetune_cli.__wrapped__  # in-process: the UserError itself, not the CLI's exit

REPO = Path(__file__).resolve().parent.parent
TOPICS = ["東京", "富士山", "寿司", "新幹線", "桜", "京都", "将棋", "温泉", "俳句", "味噌汁", "相撲", "紅葉"]
# 24 records, effective batch 4 in 2 micro-batches: 6 steps per epoch, 12 in all, so kills land
# mid-epoch and between checkpoints; dropout > 0 makes the RNG state part of what must resume.
RUN = dict(
    batch_size=4, micro_batch_size=2, num_epochs=2, learning_rate=1e-2, val_set_size=0, save_steps=4,
    logging_steps=1, lora_dropout=0.1, lora_target_modules="all-linear", warmup_steps=0, seed=7,
)  # fmt: skip


def write_data(path: Path) -> str:
    rows = [{"instruction": f"{t}について一言で。", "input": "", "output": f"{t}は有名です。"} for t in TOPICS * 2]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_adapter(got: Path, expected: Path) -> None:
    a, b = adapter_weights(got), adapter_weights(expected)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


def start_cli_run(base: str, data: str, out: Path) -> subprocess.Popen:
    flags = [f"--{k}={v}" for k, v in {**RUN, "base_model": base, "data_path": data, "output_dir": out}.items()]
    return subprocess.Popen(
        [sys.executable, str(REPO / "finetune.py"), *flags],
        cwd=out.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def signal_when(proc: subprocess.Popen, checkpoint: Path, sig: int, fired: list) -> threading.Thread:
    """Send `sig` as soon as `checkpoint` appears (the run is then between checkpoints)."""

    def watch():
        while proc.poll() is None:
            if (checkpoint / CHECKPOINT_INFO).is_file():
                fired.append(proc.poll() is None)
                proc.send_signal(sig)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """A reference run in-process while three CLI runs are killed mid-run: one with SIGKILL after
    checkpoint-4, one with Ctrl-C (SIGINT) after checkpoint-6 (the end of epoch 1), one with SIGTERM
    (preemption) after checkpoint-4."""
    root = tmp_path_factory.mktemp("resume")
    base = str(tiny_model_dir("open-calm"))
    data = write_data(root / "toy.jsonl")
    killed, ctrl_c = root / "killed", root / "ctrl_c"
    procs = {name: start_cli_run(base, data, root / name) for name in ("killed", "ctrl_c", "sigterm")}
    fired: dict[str, list] = {"killed": [], "ctrl_c": [], "sigterm": []}
    watchers = [
        signal_when(procs["killed"], killed / "checkpoint-4", signal.SIGKILL, fired["killed"]),
        signal_when(procs["ctrl_c"], ctrl_c / "checkpoint-6", signal.SIGINT, fired["ctrl_c"]),
        signal_when(procs["sigterm"], root / "sigterm" / "checkpoint-4", signal.SIGTERM, fired["sigterm"]),
    ]
    reference = root / "reference"
    finetune(base_model=base, data_path=data, output_dir=str(reference), **RUN)
    outputs = {name: proc.communicate(timeout=300) for name, proc in procs.items()}
    for watcher in watchers:
        watcher.join()
    return dict(base=base, data=data, reference=reference, procs=procs, outputs=outputs, fired=fired)


def test_sigkill_mid_run_then_resume_gives_the_same_adapter(runs):
    proc, out = runs["procs"]["killed"], runs["reference"].parent / "killed"
    assert runs["fired"]["killed"] == [True], "the run ended before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "jalora.json").exists()
    left = complete_checkpoints(out)
    assert left and all((c / "adapter_model.safetensors").is_file() for c in left)
    with pytest.raises(UserError, match="unfinished run .*--resume_from_checkpoint True"):
        finetune(base_model=runs["base"], data_path=runs["data"], output_dir=str(out), **RUN)
    finetune(base_model=runs["base"], data_path=runs["data"], output_dir=str(out), resume_from_checkpoint=True, **RUN)
    assert_same_adapter(out, runs["reference"])


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly_then_resumes_exactly(runs):
    proc, out = runs["procs"]["ctrl_c"], runs["reference"].parent / "ctrl_c"
    _, stderr = runs["outputs"]["ctrl_c"]
    assert runs["fired"]["ctrl_c"] == [True], "the run ended before Ctrl-C was sent"
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    step = int(stderr.split("interrupted at step ")[1].split(";")[0])
    assert step > 6 and f"checkpoint saved to {out / f'checkpoint-{step}'}" in stderr
    assert "--resume_from_checkpoint True" in stderr
    assert complete_checkpoints(out)[-1].name == f"checkpoint-{step}"
    assert not (out / "jalora.json").exists(), "an interrupted run must not look finished"
    finetune(
        base_model=runs["base"],
        data_path=runs["data"],
        output_dir=str(out),
        resume_from_checkpoint=str(out / f"checkpoint-{step}"),
        **RUN,
    )
    assert_same_adapter(out, runs["reference"])


def test_sigterm_saves_a_checkpoint_exits_143_then_resumes_exactly(runs):
    """Preemption (spot instances, Slurm, Kubernetes, Colab): SIGTERM behaves as Ctrl-C, with 143."""
    proc, out = runs["procs"]["sigterm"], runs["reference"].parent / "sigterm"
    _, stderr = runs["outputs"]["sigterm"]
    assert runs["fired"]["sigterm"] == [True], "the run ended before SIGTERM was sent"
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: terminated (SIGTERM) at step "), stderr[-2000:]
    step = int(errors[0].split(" at step ")[1].split(";")[0])
    assert step > 4 and f"checkpoint saved to {out / f'checkpoint-{step}'} in " in errors[0]
    assert complete_checkpoints(out)[-1].name == f"checkpoint-{step}"
    assert not (out / "jalora.json").exists() and not list(out.glob(".checkpoint-*"))
    finetune(base_model=runs["base"], data_path=runs["data"], output_dir=str(out), resume_from_checkpoint=True, **RUN)
    assert_same_adapter(out, runs["reference"])


def test_sigterm_while_loading_exits_at_once_cleanly(tiny_model_dir, monkeypatch, capsys, tmp_path):
    """SIGTERM before training (loading the model here) unwinds at once: one line, 143, nothing written."""
    import jalora.train.finetune as finetune_module

    def preempted_while_loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the signal interrupts this
        raise AssertionError("SIGTERM did not stop the load")

    base, data = str(tiny_model_dir("open-calm")), write_data(tmp_path / "toy.jsonl")
    monkeypatch.setattr(finetune_module, "build_model", preempted_while_loading)
    started = time.time()
    with pytest.raises(SystemExit) as exited:
        finetune_cli(base_model=base, data_path=data, output_dir=str(tmp_path / "out"), **RUN)
    assert exited.value.code == 143 and time.time() - started < 20
    assert capsys.readouterr().err.strip() == "error: terminated (SIGTERM); checkpoints already on disk are complete"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the handler is put back"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_checkpoints_every_save_steps_and_epoch_end_hold_the_full_state(runs):
    reference = runs["reference"]
    # save_steps 4 and epochs of 6 steps: 4, 6, 8, 12, of which the last 3 are kept
    assert [c.name for c in complete_checkpoints(reference)] == ["checkpoint-6", "checkpoint-8", "checkpoint-12"]
    checkpoint = reference / "checkpoint-6"
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (checkpoint / name).is_file(), name
    info = json.loads((checkpoint / CHECKPOINT_INFO).read_text(encoding="utf-8"))
    assert info["step"] == 6 and info["epoch"] == 1 and info["examples_seen"] == 24
    assert info["run"]["train_examples"] == 24 and info["run"]["data_fingerprint"].startswith("sha256:")
    assert not list(reference.glob(".checkpoint-*")), "no staging folder is left behind"


def test_half_written_checkpoint_is_never_resumed(runs, tmp_path):
    """A crash while saving leaves only the staging folder, or (older tools) a checkpoint-N without
    jalora's info file: neither counts, resume takes the last whole one."""
    out = tmp_path / "out"
    whole = out / "checkpoint-4"
    whole.mkdir(parents=True)
    write_json(whole / CHECKPOINT_INFO, {"step": 4})
    (out / ".checkpoint-in-progress" / "checkpoint-8").mkdir(parents=True)
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)  # half written
    assert complete_checkpoints(out) == [whole]
    with pytest.raises(UserError, match="checkpoint-6: not a complete jalora checkpoint"):
        finetune(
            base_model=runs["base"], data_path=runs["data"], output_dir=str(out),
            resume_from_checkpoint=str(out / "checkpoint-6"), **RUN,
        )  # fmt: skip


def test_resume_on_other_data_is_refused(runs, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(Path(runs["data"]).read_text(encoding="utf-8").replace("有名", "大切"), encoding="utf-8")
    checkpoint = complete_checkpoints(runs["reference"])[0]
    with pytest.raises(UserError, match="cannot resume .*data_fingerprint was"):
        finetune(
            base_model=runs["base"], data_path=str(other), output_dir=str(tmp_path / "out"),
            resume_from_checkpoint=str(checkpoint), **RUN,
        )  # fmt: skip


def test_finished_run_is_not_overwritten_without_the_flag(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "jalora.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match="already holds a finished run .*--overwrite_output_dir True"):
        finetune(base_model=runs["base"], data_path=runs["data"], output_dir=str(out), **RUN)
    with pytest.raises(UserError, match="no complete checkpoint"):
        finetune(base_model=runs["base"], data_path=runs["data"], output_dir=str(out), resume_from_checkpoint=True)
    shutil.copytree(runs["reference"] / "checkpoint-12", out / "checkpoint-12")
    assert prepare_output_dir(str(out), None, overwrite_output_dir=True) is None
    assert (out / "jalora.json").exists(), "nothing is deleted before the new run's inputs are checked"
    clear_previous_run(str(out))
    assert not (out / "jalora.json").exists() and not (out / "checkpoint-12").exists()


class SaveFailsHalfway:
    """Writes one whole file and half of another, then fails, as a full disk or a crash would."""

    def save_pretrained(self, folder: Path) -> None:
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
        raise OSError("No space left on device")


def test_write_that_fails_halfway_leaves_nothing(tmp_path):
    with pytest.raises(WriteFailed, match=f"could not write {tmp_path}: No space left on device; it needs about"):
        save_pretrained_atomic(SaveFailsHalfway(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(runs, tmp_path):
    """A learning rate of 1e30 takes one finite step (LoRA B starts at zero), after which the
    weights overflow: step 2's loss is not finite."""
    out = tmp_path / "out"
    flags = {**RUN, "learning_rate": 1e30, "save_steps": 1, "max_steps": 6, "lora_dropout": 0.0}
    with pytest.raises(NonFiniteLossError) as err:
        finetune(base_model=runs["base"], data_path=runs["data"], output_dir=str(out), **flags)
    message = str(err.value)
    assert "at step 2;" in message and "a lower --learning_rate (it was 1e+30)" in message and "--bf16" in message
    assert f"The last good checkpoint is {out / 'checkpoint-1'}" in message
    assert [c.name for c in complete_checkpoints(out)] == ["checkpoint-1"]
    weights = adapter_weights(out / "checkpoint-1")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "adapter_model.safetensors").exists() and not (out / "jalora.json").exists()
