"""What a run leaves on disk, written atomically: whole files or none, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from jalora.errors import UserError

RUN_RECORD = "jalora.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


LOW_SPACE = 1 << 20  # under 1 MiB free after a failed write: the disk is full, whatever the library says


class WriteFailed(UserError):
    """A write failed (full disk, quota, I/O error) and its partial result was removed. Not the
    user's input, so not exit status 2; the message names the path and the space it needs."""

    exit_code = 1


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def size_of(path: Path) -> int:
    """Bytes in a file, or in every file under a folder; 0 when it is absent."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} bytes"


def is_write_failure(err: BaseException, path: Path) -> bool:
    """True for a failed write. torch.save reports a full disk as a RuntimeError ("unexpected
    pos"), safetensors as a SafetensorError ("os error 28"): beside OSError, the disk's free
    space decides."""
    return isinstance(err, OSError) or "os error" in str(err) or free_bytes(path) < LOW_SPACE


@contextmanager
def reported_write_failures(
    path: Path, needed: Callable[[], int], cleanup: Callable[[], None] = lambda: None, then: str = ""
) -> Iterator[None]:
    """Turn a failed write of `path` into one line: what, why, the space it needs and has.

    `needed` is asked before `cleanup` (which removes the partial result), so it may measure
    what was written; the free space is measured after, as the user will find it.
    """
    try:
        yield
    except Exception as err:
        if not is_write_failure(err, path):
            raise
        size = needed()
        cleanup()
        free = free_bytes(path)
        if isinstance(err, OSError) and err.strerror:
            reason = err.strerror
        else:
            reason = "no space left on device" if free < LOW_SPACE + size else str(err).splitlines()[0]
        raise WriteFailed(
            f"could not write {path}: {reason}; it needs about {megabytes(size)} free, "
            f"{megabytes(free)} is free there{then}"
        ) from None


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        cleanup = lambda: Path(tmp).unlink(missing_ok=True)  # noqa: E731
        with reported_write_failures(path, lambda: len(data), cleanup), os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))


def weight_bytes(obj) -> int:
    """What `save_pretrained` will write for a model: the trainable weights of a peft model (its
    adapter), every weight of a plain one; 0 for anything else (a tokenizer)."""
    if not hasattr(obj, "parameters"):
        return 0
    adapter_only = hasattr(obj, "peft_config")
    return sum(p.numel() * p.element_size() for p in obj.parameters() if p.requires_grad or not adapter_only)


def save_pretrained_atomic(obj, out_dir: Path) -> None:
    """`obj.save_pretrained` into a temporary folder inside out_dir, then move each file into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".saving-"))
    try:
        with reported_write_failures(
            out_dir, needed=lambda: max(weight_bytes(obj), size_of(tmp)), cleanup=lambda: shutil.rmtree(tmp)
        ):
            obj.save_pretrained(tmp)
        for item in tmp.iterdir():
            target = out_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_run_record(adapter_dir: str) -> dict:
    """The run record of a finished run, or a clear error saying why the folder is not one."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise UserError(f"{adapter_dir}: adapter folder not found")
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if "adapter_model.safetensors" in missing and (folder / "adapter_model.bin").is_file():
        raise UserError(
            f"{adapter_dir}: the adapter is a pickle file (adapter_model.bin); jalora loads safetensors only, "
            "because unpickling can run code. Re-save it with peft's save_pretrained(safe_serialization=True)"
        )
    if missing:
        raise UserError(f"{adapter_dir}: not a LoRA adapter folder (missing {', '.join(missing)})")
    record_path = folder / RUN_RECORD
    if not record_path.is_file():
        return {}
    try:
        return json.loads(record_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{record_path}: unreadable run record: {err}") from None


# --- checkpoints and the output folder ------------------------------------------------------
CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's folder names: checkpoint-<global step>
CHECKPOINT_INFO = "jalora-checkpoint.json"  # written last into the staging folder before it is renamed


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints in output_dir, oldest first. Only whole ones count: jalora stages each checkpoint
    under a temporary name and renames it at the end, and writes CHECKPOINT_INFO last before that."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / CHECKPOINT_INFO).is_file()]
    found = [p for p in found if checkpoint_step(p) >= 0]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The global step in a checkpoint folder's name, or -1 if the name is not checkpoint-<N>."""
    step = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(step) if path.name.startswith(CHECKPOINT_PREFIX) and step.isdigit() else -1


def _as_resume_flag(value) -> str | bool | None:
    """fire gives True, a path, or strings such as 'true'; normalise to True / path / None."""
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "latest"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("", "false", "no", "0", "none"):
        return None
    return value or None


def prepare_output_dir(output_dir: str, resume_from_checkpoint, overwrite_output_dir: bool) -> Path | None:
    """Decide, before any work, what this run does with output_dir; return the checkpoint to resume.

    A finished run (run record present) is replaced only with --overwrite_output_dir; an
    unfinished one (checkpoints, no run record) is continued only with --resume_from_checkpoint,
    or started over with --overwrite_output_dir (see `clear_previous_run`). Silently restarting
    from scratch, or silently resuming, are both ways to lose a run.
    """
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file, not a folder")
    resume = _as_resume_flag(resume_from_checkpoint)
    if resume is not None and overwrite_output_dir:
        raise UserError("--resume_from_checkpoint and --overwrite_output_dir contradict each other; choose one")
    checkpoints = complete_checkpoints(folder)
    if resume is True:
        if not checkpoints:
            raise UserError(f"--resume_from_checkpoint True: no complete checkpoint in {output_dir}")
        return checkpoints[-1]
    if resume is not None:
        path = Path(str(resume))
        if not (path / CHECKPOINT_INFO).is_file():
            what = "not found" if not path.is_dir() else f"not a complete jalora checkpoint (no {CHECKPOINT_INFO})"
            hint = f"; complete ones: {', '.join(p.name for p in checkpoints)}" if checkpoints else ""
            raise UserError(f"--resume_from_checkpoint {resume}: {what}{hint}")
        return path
    if overwrite_output_dir:
        return None  # `clear_previous_run` empties it once the new run's inputs have passed every check
    if (folder / RUN_RECORD).is_file():
        raise UserError(
            f"--output_dir {output_dir} already holds a finished run ({RUN_RECORD}); "
            "pass --overwrite_output_dir True to replace it, or choose another --output_dir"
        )
    if checkpoints:
        raise UserError(
            f"--output_dir {output_dir} holds an unfinished run (last checkpoint: {checkpoints[-1].name}); "
            "pass --resume_from_checkpoint True to continue it, or --overwrite_output_dir True to start over"
        )
    return None


def clear_previous_run(output_dir: str) -> None:
    """For --overwrite_output_dir: drop the old run record (the folder no longer claims a finished
    run) and old checkpoints (resume must never pick one of them up)."""
    folder = Path(output_dir)
    (folder / RUN_RECORD).unlink(missing_ok=True)
    for path in folder.glob(f"{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def check_resume_matches(checkpoint: Path, run_info: dict) -> None:
    """Refuse to resume on other data or another batch layout: the saved data position would
    point somewhere else and the run would not continue, it would diverge."""
    saved = json.loads((checkpoint / CHECKPOINT_INFO).read_text(encoding="utf-8"))["run"]
    changed = [
        f"{key} was {saved.get(key)!r}, now {value!r}" for key, value in run_info.items() if saved.get(key) != value
    ]
    if changed:
        raise UserError(
            f"cannot resume from {checkpoint}: the run differs from the one that wrote it ({'; '.join(changed)}). "
            "Use the same data and batch flags, or start a new --output_dir"
        )
