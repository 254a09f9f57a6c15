"""Checkpoints you can resume from: written whole or not at all, at every --save_steps and at
each epoch end, and once more on Ctrl-C or SIGTERM (preemption).

The Trainer already stores adapter, optimizer, scheduler, RNG states and trainer state (global
step, epoch: the data position, since the sampler's order is seeded per epoch). jalora adds
three things: the folder is written under a temporary name and renamed when complete; it
carries CHECKPOINT_INFO, describing the data and batch layout the position refers to, so a
resume on other data fails loudly instead of silently continuing somewhere else; and
`SaveOnInterrupt` turns Ctrl-C and SIGTERM into "finish this step, save, exit". A save that
fails (full disk) removes its staging folder and says how much space it needs.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

from jalora.errors import INTERRUPTED_EXIT, TERMINATED_EXIT, Interrupted
from jalora.outputs import (
    CHECKPOINT_INFO,
    CHECKPOINT_PREFIX,
    complete_checkpoints,
    reported_write_failures,
    size_of,
    write_json,
)

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
        self.save_seconds = 0.0  # how long the last checkpoint took to write
        self.interrupt = SaveOnInterrupt()
        self.add_callback(CheckpointEveryEpoch())
        self.add_callback(self.interrupt)

    def train(self, *args, **kwargs):
        """`Trainer.train`, except that a run stopped by Ctrl-C or SIGTERM ends as interrupted, never
        as finished."""
        with self.interrupt.armed():
            result = super().train(*args, **kwargs)
        if self.interrupt.requested:
            step = self.state.global_step
            checkpoint = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{step}"
            terminated = self.interrupt.signal == signal.SIGTERM
            raise Interrupted(
                f"{'terminated (SIGTERM)' if terminated else 'interrupted'} at step {step}; checkpoint saved to "
                f"{checkpoint} in {self.save_seconds:.1f} s. "
                f"Continue with --resume_from_checkpoint True --output_dir {self.args.output_dir}",
                exit_code=TERMINATED_EXIT if terminated else INTERRUPTED_EXIT,
            )
        return result

    def _get_output_dir(self, trial) -> str:
        return str(self._staging) if self._staging else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        started = time.perf_counter()
        run_dir = Path(super()._get_output_dir(trial))
        step = self.state.global_step
        name = f"{CHECKPOINT_PREFIX}{step}"
        self._staging = run_dir / STAGING
        if self.args.should_save:
            shutil.rmtree(self._staging, ignore_errors=True)  # leftovers of a crash while saving
        self.accelerator.wait_for_everyone()
        earlier = complete_checkpoints(run_dir)
        then = (
            f"; the last complete checkpoint, {earlier[-1]}, is whole: free space and continue with "
            f"--resume_from_checkpoint True --output_dir {run_dir}"
            if earlier
            else "; no checkpoint was kept: free space and start again"
        )
        staging = run_dir / STAGING
        with reported_write_failures(
            run_dir / name,
            needed=lambda: max(size_of(staging), size_of(earlier[-1]) if earlier else 0),
            cleanup=lambda: shutil.rmtree(staging, ignore_errors=True),
            then=then,
        ):
            self._write_checkpoint(model, trial, run_dir, name)
        self.save_seconds = time.perf_counter() - started

    def _write_checkpoint(self, model, trial, run_dir: Path, name: str) -> None:
        """The Trainer's checkpoint, staged, with CHECKPOINT_INFO last, renamed into place."""
        try:
            super()._save_checkpoint(model, trial)
        finally:
            staged, self._staging = run_dir / STAGING / name, None
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state into the staging folder
        if not self.args.should_save:
            return
        step = self.state.global_step
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
    """Ctrl-C or SIGTERM finishes the current optimizer step, saves a checkpoint and stops training.

    SIGTERM is what spot instances, Slurm, Kubernetes and Colab send before SIGKILL: the save must
    fit their grace period (docs/training.md). The handlers are only in place while `armed`; the
    first signal puts the previous handler back, so a second one quits at once (the previous
    checkpoint stays whole). Under torchrun the ranks agree at each step end, so that all of them
    stop after the same step even when the signal reaches them in different steps.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        signal.signal(signum, self._previous[signum] or signal.SIG_DFL)
        what = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(f"\n{what}: saving a checkpoint after this step ({what} again quits now)", file=sys.stderr, flush=True)

    @contextmanager
    def armed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        try:
            yield
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler or signal.SIG_DFL)

    def on_step_end(self, args, state, control, **kwargs):
        if args.world_size > 1:
            self._agree_across_ranks(args.device)
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    def _agree_across_ranks(self, device) -> None:
        """The highest signal number any rank received (SIGTERM over Ctrl-C, 0 for none) becomes everyone's."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        received = torch.tensor([self.signal or 0], device=device)
        dist.all_reduce(received, op=dist.ReduceOp.MAX)
        self.signal = int(received.item()) or None
