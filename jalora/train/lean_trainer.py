"""The HF Trainer with three additions: one progress bar per phase (progress.py), it counts the
tokens it trains on, and it can compute the loss from supervised positions only, optionally in
chunks (jalora/train/loss.py), instead of materialising logits for every token. That shortcut runs
under the accelerator's autocast, as the Trainer's own forward does, so mixed precision is the
same on both paths.

Gradient accumulation stays the Trainer's own: it passes `num_items_in_batch` (supervised
tokens in the whole accumulated batch) to every micro-batch's loss, which makes micro-batch
2 × 4 steps equal to micro-batch 8 × 1 (tests/test_accumulation.py).
"""

from __future__ import annotations

from transformers import Trainer
from transformers.trainer_callback import ProgressCallback

from jalora.data.collate import TokenCounter
from jalora.train.loss import causal_lm_loss
from jalora.train.progress import PhaseProgress, ThroughputCallback


class LeanTrainer(Trainer):
    def __init__(self, *args, supervised_head: bool = False, ce_chunk_size: int | None = None, **kwargs):
        self.counter = TokenCounter()
        self.throughput = ThroughputCallback(self.counter)  # before the progress bar, which prints its figures
        self.supervised_head = supervised_head
        self.ce_chunk_size = ce_chunk_size
        super().__init__(*args, callbacks=[self.throughput, *(kwargs.pop("callbacks", None) or [])], **kwargs)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(PhaseProgress())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.counter.add(inputs)
        if not self.supervised_head or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # accelerate puts autocast around model.forward only; the shortcut calls the decoder itself
        with self.accelerator.autocast():
            return causal_lm_loss(self.model, inputs, num_items_in_batch, self.ce_chunk_size)
