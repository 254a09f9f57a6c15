"""`--stop` strings: end generation when the answer contains one, and cut the answer there.

Stops are matched on decoded text, not token ids, because a string such as `### 指示` is
tokenized differently at every position (and byte-level tokenizers split its characters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteria

from jalora.errors import UserError


def parse_stops(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """--stop as one string or a list of strings (fire turns `["a","b"]` into a list).

    A typed `\\n` or `\\t` means a newline or tab: shells pass `--stop "\\n"` as two characters.
    """
    if stop is None or stop == "":
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise UserError(f"--stop takes non-empty strings, got {stop!r}")
    return tuple(s.replace("\\n", "\n").replace("\\t", "\t") for s in stops)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the earliest stop string (the stop itself dropped)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(found)] if found else text


def partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-k:]):
                longest = k
                break
    return longest


class StopOnStrings(StoppingCriteria):
    """Marks a row done once the text of its answer (ids after `start`) contains a stop string."""

    def __init__(self, stops: Sequence[str], start: int, decode: Callable[[list[int]], str]):
        self.stops = tuple(stops)
        self.start = start
        self.decode = decode
        # a character is at most 4 tokens (bytes); 32 more covers tokens accepted in one assisted step
        self.window = 4 * max(len(s) for s in self.stops) + 32

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        tails = input_ids[:, max(self.start, input_ids.shape[1] - self.window) :].tolist()
        done = [any(s in self.decode(tail) for s in self.stops) for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
