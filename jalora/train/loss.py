"""Cross-entropy without the full logits tensor.

The head is applied only to positions whose next token is supervised: prompt tokens never
get logits, which saves the head's compute and memory for them (the head of a small model is
a large share of its FLOPs). For a 128k vocabulary the supervised logits (tokens × vocab,
upcast to fp32, plus their gradient) are still the largest tensor of a LoRA step, so with a
chunk size they are built a chunk at a time and recomputed in the backward pass instead of
being stored: at most one chunk of logits is alive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from jalora.data.records import IGNORE_INDEX

# Model types whose logits are exactly `lm_head(last_hidden_state)` (no scaling or soft-capping).
SUPERVISED_HEAD_MODELS = ("llama", "qwen2", "gpt_neox", "mistral")
LARGE_VOCAB = 65536


def supports_supervised_head(config) -> bool:
    return config.model_type in SUPERVISED_HEAD_MODELS


def wants_chunked_ce(config, requested: bool | None) -> bool:
    """On when asked; by default for supported models with a vocabulary of 64k tokens or more."""
    if requested is None:
        return supports_supervised_head(config) and config.vocab_size >= LARGE_VOCAB
    return requested and supports_supervised_head(config)


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Next-token loss of `head(hidden)` against `labels` (unshifted, -100 = ignored), summed
    over supervised positions and divided by `num_items_in_batch` (else their count): the same
    number transformers' causal-LM loss gives. `chunk_size` None: one piece, nothing recomputed."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = targets[keep]
    if chunk_size is None:
        return _chunk_loss(head, hidden, targets) / _denominator(num_items_in_batch, keep)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_size):
        piece = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_loss, head, hidden[piece], targets[piece], use_reentrant=False)
    return total / _denominator(num_items_in_batch, keep)


def _denominator(num_items_in_batch, keep: torch.Tensor):
    return num_items_in_batch if num_items_in_batch is not None else keep.sum()


def causal_lm_loss(model, inputs: dict, num_items_in_batch=None, chunk_size: int | None = None) -> torch.Tensor:
    """The model's training loss, with the head applied to supervised positions only (in chunks if given).
    `model` may be a peft model: its LoRA layers sit inside the decoder and head modules."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, base.base_model_prefix)
    features = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = decoder(**features).last_hidden_state
    return chunked_cross_entropy(hidden, base.get_output_embeddings(), inputs["labels"], num_items_in_batch, chunk_size)
