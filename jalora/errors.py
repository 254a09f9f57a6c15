"""User mistakes become one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)
INTERRUPTED_EXIT = 130  # what shells report for a process ended by Ctrl-C


class UserError(Exception):
    """Something the user can fix: a bad file, flag or path. The message says what and where."""

    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C: the run stopped on purpose (after saving what could be saved)."""

    exit_code = INTERRUPTED_EXIT


def friendly_errors(fn: F) -> F:
    """Wrap a CLI entry point: print a UserError as `error: ...` and exit with its status (2, or
    130 for Ctrl-C). A second Ctrl-C, or one outside training, exits the same way."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None
        except KeyboardInterrupt:
            print("error: interrupted (Ctrl-C); checkpoints already on disk are complete", file=sys.stderr)
            raise SystemExit(INTERRUPTED_EXIT) from None

    return wrapper  # type: ignore[return-value]
