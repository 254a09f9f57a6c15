"""What a run leaves on disk, written atomically: whole files or none, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from jalora.errors import UserError

RUN_RECORD = "jalora.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))


def save_pretrained_atomic(obj, out_dir: Path) -> None:
    """`obj.save_pretrained` into a temporary folder inside out_dir, then move each file into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".saving-"))
    try:
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
    if missing:
        raise UserError(f"{adapter_dir}: not a LoRA adapter folder (missing {', '.join(missing)})")
    record_path = folder / RUN_RECORD
    if not record_path.is_file():
        return {}
    try:
        return json.loads(record_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{record_path}: unreadable run record: {err}") from None
