"""User mistakes become one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Something the user can fix: a bad file, flag or path. The message says what and where."""


def friendly_errors(fn: F) -> F:
    """Wrap a CLI entry point: print a UserError as `error: ...` and exit with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
