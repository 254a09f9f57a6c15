"""Batches for the Trainer: right-padded, with padding masked by position."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jalora.data import IGNORE_INDEX


@dataclass
class PadCollator:
    """Pad each micro-batch to its longest example. Padding gets attention 0 and label -100,
    whatever the pad id is, so an eos inside the text is never mistaken for padding."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids, labels, attention = [], [], []
        for f in features:
            n = len(f["input_ids"])
            gap = longest - n
            input_ids.append(f["input_ids"] + [self.pad_token_id] * gap)
            labels.append(f["labels"] + [IGNORE_INDEX] * gap)
            attention.append([1] * n + [0] * gap)
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(attention),
        }
