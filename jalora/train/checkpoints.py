"""Checkpoints you can resume from: written whole or not at all, at every --save_steps and at
each epoch end, and once more when the user presses Ctrl-C.

The Trainer already stores adapter, optimizer, scheduler, RNG states and trainer state (global
step, epoch: the data position, since the sampler's order is seeded per epoch). jalora adds
three things: the folder is written under a temporary name and renamed when complete; it
carries CHECKPOINT_INFO, describing the data and batch layout the position refers to, so a
resume on other data fails loudly instead of silently continuing somewhere else; and
`SaveOnInterrupt` turns Ctrl-C into "finish this step, save, exit".
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

from jalora.errors import Interrupted
from jalora.outputs import CHECKPOINT_INFO, CHECKPOINT_PREFIX, write_json

STAGING = ".checkpoint-in-progress"  # never matches checkpoint-N, so no loader picks it up


class CheckpointingTrainer(Trainer):
    """A Trainer whose checkpoints appear whole or not at all, also at each epoch end and on Ctrl-C.

    The Trainer writes `checkpoint-N/` file by file; a crash in the middle leaves a folder that
    `resume_from_checkpoint=True` would pick. Here the Trainer writes into a staging folder,
    CHECKPOINT_INFO is added last, and the folder is renamed into place.
    `run_info` (data fingerprint, example count, batch layout) goes into CHECKPOINT_INFO.
    """

    def __init__(self, *args, run_info: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_info = run_info
        self._staging: Path | None = None
        self.interrupt = SaveOnInterrupt()
        self.add_callback(CheckpointEveryEpoch())
        self.add_callback(self.interrupt)

    def train(self, *args, **kwargs):
        """`Trainer.train`, except that a run stopped by Ctrl-C ends as interrupted, never as finished."""
        with self.interrupt.armed():
            result = super().train(*args, **kwargs)
        if self.interrupt.requested:
            step = self.state.global_step
            checkpoint = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{step}"
            raise Interrupted(
                f"interrupted at step {step}; checkpoint saved to {checkpoint}. "
                f"Continue with --resume_from_checkpoint True --output_dir {self.args.output_dir}"
            )
        return result

    def _get_output_dir(self, trial) -> str:
        return str(self._staging) if self._staging else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        step = self.state.global_step
        name = f"{CHECKPOINT_PREFIX}{step}"
        self._staging = run_dir / STAGING
        if self.args.should_save:
            shutil.rmtree(self._staging, ignore_errors=True)  # leftovers of a crash while saving
        self.accelerator.wait_for_everyone()
        try:
            super()._save_checkpoint(model, trial)
        finally:
            staged, self._staging = run_dir / STAGING / name, None
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state into the staging folder
        if not self.args.should_save:
            return
        per_step = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        info = {"step": step, "epoch": self.state.epoch, "examples_seen": step * per_step, "run": self.run_info}
        write_json(staged / CHECKPOINT_INFO, info)
        final = run_dir / name
        if final.exists():  # the same step saved before (e.g. by a run that was later resumed earlier)
            shutil.rmtree(final)
        os.replace(staged, final)
        shutil.rmtree(run_dir / STAGING, ignore_errors=True)
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit, use_mtime=False)


class CheckpointEveryEpoch(TrainerCallback):
    """Save at the end of every epoch as well as every --save_steps (unless that step was just saved)."""

    def __init__(self):
        self.last_saved = -1

    def on_save(self, args, state, control, **kwargs):
        self.last_saved = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.global_step != self.last_saved:
            control.should_save = True


class SaveOnInterrupt(TrainerCallback):
    """Ctrl-C finishes the current optimizer step, saves a checkpoint and stops training.

    The handler is only in place while `armed`; the first Ctrl-C puts the previous handler back,
    so a second one quits at once (the previous checkpoint stays whole).
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        print("\nCtrl-C: saving a checkpoint after this step (press Ctrl-C again to quit now)", file=sys.stderr)

    @contextmanager
    def armed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        self._previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, self._previous)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
