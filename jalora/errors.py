"""User mistakes become one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)
INTERRUPTED_EXIT = 130  # what shells report for a process ended by Ctrl-C (128 + SIGINT)
TERMINATED_EXIT = 143  # and for one ended by SIGTERM (128 + 15): preemption, Slurm, Kubernetes, Colab


class UserError(Exception):
    """Something the user can fix: a bad file, flag or path. The message says what and where."""

    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C or SIGTERM: the run stopped on purpose (after saving what could be saved)."""

    def __init__(self, message: str, exit_code: int = INTERRUPTED_EXIT):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM outside training (loading, evaluating): unwinds like Ctrl-C, so `finally` blocks
    run (locks are released, temporary files removed). A BaseException, as KeyboardInterrupt is,
    so that no library's `except Exception` swallows it; not a KeyboardInterrupt, which some
    libraries catch and turn into a normal return."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def friendly_errors(fn: F) -> F:
    """Wrap a CLI entry point: print a UserError as `error: ...` and exit with its status (2, or
    130 / 143 after Ctrl-C / SIGTERM). A second Ctrl-C, or one outside training, exits the same
    way; so does SIGTERM outside training (inside it, training saves a checkpoint first)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        own_handler = (
            threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        )
        if own_handler:
            signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None
        except KeyboardInterrupt:
            print("error: interrupted (Ctrl-C); checkpoints already on disk are complete", file=sys.stderr)
            raise SystemExit(INTERRUPTED_EXIT) from None
        except Terminated:
            print("error: terminated (SIGTERM); checkpoints already on disk are complete", file=sys.stderr)
            raise SystemExit(TERMINATED_EXIT) from None
        finally:
            if own_handler:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return wrapper  # type: ignore[return-value]
