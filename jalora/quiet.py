"""Quiet by default: a command prints what jalora has to say, not what its libraries say.

Left alone, a 4-bit run opens with bitsandbytes' "Failed to load CPU gemm_4bit_forward from
kernels-community" (a logging warning on import), then transformers' and peft's FutureWarnings
and UserWarnings, a weight-loading bar and, for a GGUF base, a de-quantization bar. None of it
needs the user's attention. Every command calls `quiet_third_party(verbose)` first; `--verbose`
leaves everything as the libraries made it. Errors are unaffected: they are exceptions, which
jalora turns into one line (errors.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator

# loggers of the libraries a run imports; jalora's own logger keeps its level
THIRD_PARTY_LOGGERS = (
    "accelerate",
    "bitsandbytes",
    "datasets",
    "gguf",
    "huggingface_hub",
    "peft",
    "torch",
    "transformers",
    "trl",
)
_verbose = True  # a library user who never calls quiet_third_party keeps the libraries' own output


def quiet_imports() -> None:
    """Called when the jalora package is first imported, i.e. before the commands' own imports load
    bitsandbytes, which logs its missing-CPU-kernel warning on import, before any flag is parsed.
    `--verbose` on the command line keeps it."""
    if not any(arg.startswith("--verbose") for arg in sys.argv[1:]):
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def quiet_third_party(verbose: bool = False) -> None:
    """Silence Python warnings, third-party log lines below ERROR and the libraries' progress
    bars for the rest of the process, unless `verbose`."""
    global _verbose
    _verbose = verbose
    if verbose:
        return
    warnings.simplefilter("ignore")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    # transformers sets its logger's level once, on first use: set it through its own API
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def library_bars_hidden() -> Iterator[None]:
    """Swallow what a model load writes to stderr (unless verbose). transformers' GGUF loader draws
    its de-quantization bar with tqdm directly, which no library switch turns off; exceptions
    still propagate."""
    if _verbose:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield
