"""Stop at the first NaN/inf training loss, before it can reach a checkpoint.

The Trainer by default hides a non-finite loss in its logs (it logs the running mean instead)
and goes on saving checkpoints of a model whose weights are already NaN. This callback sees
the loss of every training micro-batch, and at the end of the step that produced a bad one
raises, before the Trainer's save for that step, so the newest checkpoint is the last good one.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from jalora.errors import UserError
from jalora.outputs import checkpoint_step, complete_checkpoints


class NonFiniteLossError(UserError):
    """Training diverged: the message names the step, the last good checkpoint and the fix."""


class StopOnNonFiniteLoss(TrainerCallback):
    """The trainer reports every training loss to `observe`; the step that produced a bad one ends
    with NonFiniteLossError, raised before the Trainer saves that step."""

    def __init__(self):
        self.bad_loss: float | None = None

    def observe(self, loss: torch.Tensor) -> None:
        if self.bad_loss is None and not torch.isfinite(loss.detach()).all():
            self.bad_loss = float(loss.detach().float().sum())

    def on_step_end(self, args, state, control, **kwargs):
        if self.bad_loss is not None:
            raise NonFiniteLossError(self.message(args, state.global_step))

    def message(self, args, step: int) -> str:
        value = "NaN" if math.isnan(self.bad_loss) else "inf"
        good = [c for c in complete_checkpoints(args.output_dir) if checkpoint_step(c) < step]
        kept = f"The last good checkpoint is {good[-1]}" if good else "No checkpoint had been saved yet"
        fixes = [f"start again with a lower --learning_rate (it was {args.learning_rate:g}), e.g. 10x lower"]
        if args.fp16:
            fixes.append("use --bf16 True instead of --fp16 (fp16 overflows to inf)")
        else:
            fixes.append("if you train in fp16, use --bf16 True instead (fp16 overflows to inf)")
        return f"the training loss became {value} at step {step}; training stopped. {kept}. Try: " + "; ".join(fixes)


class NanGuarded:
    """Trainer mixin: every training micro-batch's loss goes to a StopOnNonFiniteLoss callback."""

    def __init__(self, *args, **kwargs):
        self.nan_guard = StopOnNonFiniteLoss()
        super().__init__(*args, callbacks=[self.nan_guard], **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.nan_guard.observe(result[0] if return_outputs else result)
        return result
