"""Faults of shared and rented machines: a full disk and two runs on one output.

The full disk is real: a size-limited tmpfs mounted for the test (as root; skipped with the
reason where mounting is refused) and filled with a preallocated file, so the libraries'
own writers (torch.save, safetensors, gguf, json) meet ENOSPC from the kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_export import random_adapter
from test_resume import RUN, assert_same_adapter, write_data

from jalora.errors import UserError
from jalora.export.gguf import export as export_cli
from jalora.export.merge import merge as merge_cli
from jalora.generate.command import main as generate_cli
from jalora.outputs import CHECKPOINT_INFO, WriteFailed, complete_checkpoints, size_of, write_json
from jalora.run_lock import lock_path, run_lock
from jalora.train.finetune import finetune as finetune_cli

REPO = Path(__file__).resolve().parent.parent
finetune, merge, export, generate = (f.__wrapped__ for f in (finetune_cli, merge_cli, export_cli, generate_cli))
ONE_EPOCH = {**RUN, "num_epochs": 1}  # 6 steps: checkpoint-4 (save_steps) and checkpoint-6 (epoch end)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs: `fill(leave)` takes all but `leave` bytes of it, `unfill()` gives them back."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield Disk(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class Disk:
    def __init__(self, root: Path):
        self.root = root
        self.filler = root / "filler"

    def fill(self, leave: int) -> None:
        self.unfill()
        take = (shutil.disk_usage(self.root).free - leave) // 4096 * 4096
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, 0, take)
        finally:
            os.close(fd)

    def unfill(self) -> None:
        self.filler.unlink(missing_ok=True)


def assert_one_line_about(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"could not write {path}: "), message
    assert (
        "no space left on device" in message.lower() and " it needs about " in message and " is free there" in message
    )


# --- a full disk ---------------------------------------------------------------------------
def test_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_resume_works(small_disk, tiny_model_dir, tmp_path):
    base, data = str(tiny_model_dir("open-calm")), write_data(tmp_path / "toy.jsonl")
    reference = tmp_path / "reference"
    finetune(base_model=base, data_path=data, output_dir=str(reference), **ONE_EPOCH)
    checkpoint = size_of(reference / "checkpoint-4")
    # room for checkpoint-4 and half of another: checkpoint-6 meets ENOSPC
    small_disk.fill(leave=checkpoint * 3 // 2 + 64 * 1024)
    out = small_disk.root / "out"
    with pytest.raises(WriteFailed) as err:
        finetune(base_model=base, data_path=data, output_dir=str(out), **ONE_EPOCH)
    assert_one_line_about(err, out / "checkpoint-6")
    assert f"the last complete checkpoint, {out / 'checkpoint-4'}, is whole" in str(err.value)
    assert "--resume_from_checkpoint True" in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4"], "no staging folder, adapter or run record"
    assert (out / "checkpoint-4" / CHECKPOINT_INFO).is_file() and size_of(out / "checkpoint-4") == checkpoint

    small_disk.unfill()
    finetune(base_model=base, data_path=data, output_dir=str(out), resume_from_checkpoint=True, **ONE_EPOCH)
    assert_same_adapter(out, reference)
    assert (out / "jalora.json").is_file()


def test_full_disk_while_saving_the_adapter_or_run_record_keeps_the_old_ones(small_disk, tiny_model_dir):
    base = str(tiny_model_dir("llama3-elyza"))
    run = small_disk.root / "run"
    model = random_adapter(base, "llama3-elyza", "none", run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    small_disk.fill(leave=8 * 1024)
    from jalora.outputs import save_pretrained_atomic

    with pytest.raises(WriteFailed) as err:
        save_pretrained_atomic(model, run)
    assert_one_line_about(err, run)
    with pytest.raises(WriteFailed) as err:
        write_json(run / "jalora.json", {"padding": "x" * 100_000})
    assert_one_line_about(err, run / "jalora.json")
    assert str(err.value).count("100.0 kB") == 1  # what the record needs
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before, "the earlier adapter and record stay whole"


def test_full_disk_while_merging_or_exporting_leaves_nothing_then_works(small_disk, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    random_adapter(str(tiny_model_dir("llama3-elyza")), "llama3-elyza", "none", run)
    small_disk.fill(leave=64 * 1024)
    merged, gguf = small_disk.root / "merged", small_disk.root / "gguf"
    with pytest.raises(WriteFailed) as err:
        merge(lora_weights=str(run), output_dir=str(merged), dtype="float32")
    assert_one_line_about(err, merged)
    with pytest.raises(WriteFailed) as err:
        export(lora_weights=str(run), output_dir=str(gguf))
    assert_one_line_about(err, gguf / "run-f16.gguf")
    left = [p.name for p in small_disk.root.rglob("*") if p.is_file() and p != small_disk.filler]
    assert left == [], f"half-written files left: {left}"

    small_disk.unfill()
    merge(lora_weights=str(run), output_dir=str(merged), dtype="float32")
    assert (merged / "model.safetensors").is_file() and (merged / "config.json").is_file()
    assert Path(export(lora_weights=str(run), output_dir=str(gguf))).is_file()


def test_full_disk_while_answering_a_file_keeps_whole_answers_then_continues(small_disk, tiny_model_dir, tmp_path):
    adapter = tmp_path / "run"
    random_adapter(str(tiny_model_dir("llama3-elyza")), "llama3-elyza", "none", adapter)
    # a 6 kB field per record (kept in the answers) makes every answer need pages of its own
    rows = [{"instruction": f"{t}について一言で。", "note": "x" * 6000} for t in ("東京", "京都", "寿司", "桜")]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    flags = dict(lora_weights=str(adapter), data_path=str(requests), batch_size=1, max_new_tokens=8)
    expected = tmp_path / "expected.jsonl"
    generate(output_file=str(expected), **flags)
    whole = expected.read_text(encoding="utf-8").splitlines(keepends=True)

    answers = small_disk.root / "answers.jsonl"
    answers.write_text("".join(whole[:2]), encoding="utf-8")  # an earlier run answered two
    small_disk.fill(leave=0)
    with pytest.raises(WriteFailed) as err:
        generate(output_file=str(answers), **flags)
    assert_one_line_about(err, answers)
    assert "the 2 answers before it are whole" in str(err.value)
    assert answers.read_text(encoding="utf-8") == "".join(whole[:2])

    small_disk.unfill()
    generate(output_file=str(answers), **flags)
    assert answers.read_text(encoding="utf-8") == "".join(whole)


# --- one run per output --------------------------------------------------------------------
def test_a_second_run_on_a_live_runs_folder_is_refused_and_a_killed_runs_lock_does_not_block(tiny_model_dir, tmp_path):
    base, data, out = str(tiny_model_dir("open-calm")), write_data(tmp_path / "toy.jsonl"), tmp_path / "out"
    endless = {**RUN, "base_model": base, "data_path": data, "output_dir": out, "max_steps": 100000, "save_steps": 1}
    long_run = [f"--{k}={v}" for k, v in endless.items()]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, str(REPO / "finetune.py"), *long_run], env=env, cwd=tmp_path)
    try:
        deadline = time.time() + 300
        while not complete_checkpoints(out):
            assert first.poll() is None and time.time() < deadline, "the first run did not start training"
            time.sleep(0.2)
        second = subprocess.run(
            [sys.executable, str(REPO / "finetune.py"), *long_run],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert first.poll() is None, "the first run is still training"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines() == [
        line for line in second.stderr.strip().splitlines() if line.startswith("error:")
    ]
    message = second.stderr.strip()
    assert message.startswith(f"error: --output_dir {out} is in use by another jalora run (pid {first.pid} ")
    assert f"on host {socket.gethostname()} since " in message and ": finetune.py --batch_size=4 " in message
    assert message.endswith(f"wait for it to end, or choose another --output_dir (lock: {lock_path(out)})")
    assert lock_path(out).is_file(), "SIGKILL left the lock file behind"

    step = int(complete_checkpoints(out)[-1].name.split("-")[1])
    finetune(
        base_model=base, data_path=data, output_dir=str(out), resume_from_checkpoint=True,
        **{**RUN, "max_steps": step + 1, "save_steps": 1},
    )  # fmt: skip
    assert (out / "jalora.json").is_file() and not lock_path(out).exists()


def test_merge_export_and_batch_generate_are_refused_on_a_held_output(tiny_model_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    random_adapter(str(tiny_model_dir("llama3-elyza")), "llama3-elyza", "none", run)
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        json.dumps({"instruction": "東京について一言で。"}, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    holder = f"pid {os.getpid()} on host {socket.gethostname()}"
    merged, answers = tmp_path / "merged", tmp_path / "answers.jsonl"
    with run_lock(merged, "--output_dir"), pytest.raises(UserError, match=f"in use by another jalora run \\({holder}"):
        merge(lora_weights=str(run), output_dir=str(merged))
    with run_lock(tmp_path / "gguf", "--output_dir"), pytest.raises(UserError, match=holder):
        export(lora_weights=str(run), output_dir=str(tmp_path / "gguf"))
    with run_lock(answers, "--output_file"), pytest.raises(UserError, match=f"--output_file {answers} is in use"):
        generate(lora_weights=str(run), data_path=str(requests), output_file=str(answers))
    with run_lock(run, "--output_dir"), pytest.raises(UserError, match=f"--lora_weights {run} is still being written"):
        export(lora_weights=str(run), output_dir=str(tmp_path / "gguf"))
    assert not answers.exists() and not merged.exists()

    # a torchrun rank other than 0 takes no lock (rank 0 holds it for the job)
    monkeypatch.setenv("RANK", "1")
    with run_lock(merged, "--output_dir"):
        merge(lora_weights=str(run), output_dir=str(merged), dtype="float32")
    assert (merged / "model.safetensors").is_file()
