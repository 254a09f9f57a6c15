"""`--stream`: print the answer while it is generated, never a broken character.

Byte-level tokenizers (open-calm, Qwen, Llama-3) split one kanji into up to three tokens, and
byte-fallback tokenizers do the same for rare characters, so decoding token by token prints
U+FFFD. We decode the whole answer so far and print only the part that can no longer change:
not a trailing U+FFFD (an unfinished character), not trailing whitespace (tokenizers may tidy
it away once the next token arrives), not an end that may be the start of a `--stop` string.
The printed pieces therefore join to exactly the non-streaming answer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence

from transformers.generation.streamers import BaseStreamer

from jalora.generate.stop_strings import cut_at_stop, partial_stop_length


class IncrementalText:
    """Turns a growing list of answer ids into text pieces that are final once printed."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode = decode
        self.stops = tuple(stops)
        self.ids: list[int] = []
        self.emitted = ""

    def text(self) -> str:
        """The answer so far, exactly as the non-streaming path returns it."""
        return cut_at_stop(self.decode(self.ids), self.stops)

    def push(self, ids: list[int]) -> str:
        """Add ids; return the newly printable text (may be empty)."""
        self.ids += ids
        safe = self.text().rstrip("\ufffd").rstrip()
        safe = safe[: len(safe) - partial_stop_length(safe, self.stops)]
        return self._advance(safe) if len(safe) > len(self.emitted) else ""

    def finish(self) -> str:
        """Whatever is left once generation has ended."""
        return self._advance(self.text())

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted):  # a decoder rewrote printed text: keep what is printed
            return ""
        piece, self.emitted = text[len(self.emitted) :], text
        return piece


class _QueueStreamer(BaseStreamer):
    """Receives ids from generate() (the prompt first, then new tokens) and queues the new ones."""

    def __init__(self):
        self.queue: queue.Queue[list[int] | None] = queue.Queue()
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


def stream_pieces(run: Callable[[BaseStreamer], object], text: IncrementalText) -> Iterator[str]:
    """Run `run(streamer)` (a generate call) in a thread and yield printable pieces as they come."""
    streamer = _QueueStreamer()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            run(streamer)
        except BaseException as err:  # re-raised in the caller's thread below
            failure.append(err)
            streamer.end()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while (ids := streamer.queue.get()) is not None:
        if piece := text.push(ids):
            yield piece
    thread.join()
    if failure:
        raise failure[0]
    if piece := text.finish():
        yield piece
