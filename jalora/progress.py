"""Throughput on the progress bar and in the run record: real tokens per second of training
time, and padding efficiency (real tokens / tokens the model processed)."""

from __future__ import annotations

import time

from transformers import TrainerCallback

from jalora.collate import TokenCounter


class ThroughputCallback(TrainerCallback):
    """Times optimizer steps (evaluation and saving excluded) and reads the trainer's token counter.

    Adds `tokens_per_s` and `padding_efficiency` to every log line (the progress bar prints them)
    and keeps the totals in `summary()` for the run record."""

    def __init__(self, counter: TokenCounter):
        self.counter = counter
        self.seconds = self.cpu_seconds = 0.0
        self._started = (0.0, 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._started[0]
        self.cpu_seconds += time.process_time() - self._started[1]  # robust to a busy shared machine

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs.update(self.summary())

    def summary(self) -> dict:
        return {
            "tokens_per_s": round(self.counter.real / self.seconds, 1) if self.seconds else 0.0,
            "padding_efficiency": round(self.counter.padding_efficiency, 4),
            "train_tokens": self.counter.real,
            "train_step_seconds": round(self.seconds, 2),
            "train_cpu_seconds": round(self.cpu_seconds, 2),
        }
