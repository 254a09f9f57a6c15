"""Throughput on the progress bar and in the run record: real tokens per second of training
time, and padding efficiency (real tokens / tokens the model processed); the bar itself."""

from __future__ import annotations

import time

from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_utils import has_length

from jalora.data.collate import TokenCounter


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


class PhaseProgress(TrainerCallback):
    """One bar per phase in place of transformers' ProgressCallback, which writes every log dict
    as a raw line between its bars. Training shows loss, held-out loss and tokens/s in the bar's
    postfix (the bar itself shows the ETA); an evaluation gets a bar that goes when it is done."""

    def __init__(self):
        self.training = self.evaluating = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.training is not None:
            self.training.update(state.global_step - self.training.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training is None or not logs:
            return
        if "loss" in logs:
            self.postfix["loss"] = f"{logs['loss']:.4f}"
        if "eval_loss" in logs:
            self.postfix["eval_loss"] = f"{logs['eval_loss']:.4f}"
        if "tokens_per_s" in logs:
            self.postfix["tok/s"] = f"{logs['tokens_per_s']:.0f}"
        self.training.set_postfix(self.postfix)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero or not has_length(eval_dataloader):
            return
        if self.evaluating is None:
            self.evaluating = tqdm(total=len(eval_dataloader), desc="evaluating", unit="batch", leave=False)
        self.evaluating.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.evaluating is not None:
            self.evaluating.close()
            self.evaluating = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.training is not None:
            self.training.close()
            self.training = None
