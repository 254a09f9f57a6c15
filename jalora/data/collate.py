"""Batches for the Trainer: padded rows, or packed rows with no padding at all.

Both collators mask the first label of every example. A causal LM predicts token i+1 from
token i, so that label is never a target; masking it keeps the Trainer's count of
supervised tokens (its loss denominator across accumulation) exact, and in a packed row it
stops an example's first token from being predicted from the end of the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jalora.data.records import IGNORE_INDEX


@dataclass
class TokenCounter:
    """Tokens the model was fed (`processed`) and the ones that were real text (`real`)."""

    real: int = 0
    processed: int = 0

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        mask = batch.get("attention_mask")
        self.processed += batch["input_ids"].numel()
        self.real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    @property
    def padding_efficiency(self) -> float:
        return self.real / self.processed if self.processed else 1.0


def _labels(example: dict) -> list[int]:
    return [IGNORE_INDEX, *example["labels"][1:]]


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
            labels.append(_labels(f) + [IGNORE_INDEX] * gap)
            attention.append([1] * n + [0] * gap)
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(attention),
        }


@dataclass
class PackCollator:
    """Concatenate the micro-batch's examples into one row, with position ids restarting at 0
    for each example, no attention mask, and the examples' boundaries. The model then attends
    only within an example (per-example sdpa, flash attention's variable-length path, or a
    block-diagonal causal mask), so the loss equals unpadded training while no padding token
    is ever computed."""

    def __call__(self, features: list[dict]) -> dict:
        input_ids, labels, positions, bounds = [], [], [], [0]
        for f in features:
            input_ids += f["input_ids"]
            labels += _labels(f)
            positions += range(len(f["input_ids"]))
            bounds.append(len(input_ids))
        cu_seq_lens = torch.tensor(bounds, dtype=torch.int32)
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        return {
            "input_ids": torch.tensor([input_ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
            # a KV cache (use_cache defaults to True, even in training) switches packed-sequence detection off
            "use_cache": False,
            # example boundaries, for flash attention's variable-length path and jalora/model/packed_attention.py
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest,
            "max_length_k": longest,
        }
