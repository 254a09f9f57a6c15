"""One jalora command at a time per output: two runs writing one folder (a second terminal, a
re-run notebook cell, a mislaunched job) would interleave checkpoints and run records.

The lock is an `fcntl.flock` on a small file beside the output (`.NAME.lock`, never inside it:
merge and export want an empty folder). The kernel drops a flock when its process dies, so a
lock left by a SIGKILLed run never blocks the next run or its resume. The file holds the owner's
pid, host, start time and command line, for the message that refuses a second run. Written here
rather than with the `filelock` package because filelock truncates the file on every attempt,
which would erase the owner's name the refusal needs.
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from jalora.errors import UserError

F = TypeVar("F", bound=Callable)


def lock_path(output: str | Path) -> Path:
    """`.NAME.lock` beside the output folder or file; resolved, so `out` and `./out/` share it."""
    target = Path(output).resolve()
    return target.with_name(f".{target.name}.lock")


def _owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} on host {info['host']} since {started}: {info['command']}"
    except (OSError, ValueError, KeyError):
        return "a process that has not written its name yet"


def _try_lock(path: Path) -> int | None:
    """An fd holding the flock on `path`, or None when another process holds it. Retries when the
    file was replaced between open and flock (its owner removed it on release)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def is_rank_zero() -> bool:
    """Under torchrun (or accelerate launch) only global rank 0 takes locks; other ranks write nothing of their own."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def run_lock(output: str | Path, flag: str) -> Iterator[None]:
    """Hold the lock of `output` for the block, or refuse at once with the holder's name."""
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _try_lock(path)
    if fd is None:
        raise UserError(
            f"{flag} {output} is in use by another jalora run ({_owner(path)}); wait for it to end, "
            f"or choose another {flag} (lock: {path})"
        )
    try:
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        }
        os.ftruncate(fd, 0)
        try:
            os.write(fd, json.dumps(owner, ensure_ascii=False).encode("utf-8"))
        except OSError:
            pass  # a full disk: the lock holds all the same, only the refusal cannot name its holder
        yield
    finally:
        path.unlink(missing_ok=True)  # before the flock goes, so no one locks a file that is gone
        os.close(fd)


def refuse_if_locked(output: str | Path, flag: str) -> None:
    """For inputs: refuse to read an output another run is still writing (an adapter in training).
    Creates nothing, so read-only inputs are fine."""
    path = lock_path(output)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(
            f"{flag} {output} is still being written by another jalora run ({_owner(path)}); wait for it to end"
        ) from None
    finally:
        os.close(fd)


def locks_output(parameter: str, flag: str | None = None) -> Callable[[F], F]:
    """Decorate a command so that it holds the lock of its `parameter` (an output folder or file)
    while it runs. No lock when the argument is None, or on a torchrun rank other than 0."""
    flag = flag or f"--{parameter}"

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            output = bound.arguments[parameter]
            if output is None or not is_rank_zero():
                return fn(*args, **kwargs)
            with run_lock(output, flag):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
