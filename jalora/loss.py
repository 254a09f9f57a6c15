"""Cross-entropy without the full logits tensor.

For a 128k vocabulary the logits (tokens × vocab, upcast to fp32 for the loss, plus their
gradient) are the largest tensor of a LoRA step. Here the head is applied only to positions
whose next token is supervised, a chunk at a time, and each chunk is recomputed in the
backward pass instead of being stored, so at most one chunk of logits is alive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from jalora.data import IGNORE_INDEX

# Model types whose logits are exactly `lm_head(last_hidden_state)` (no scaling or soft-capping).
CHUNKED_CE_MODELS = ("llama", "qwen2", "gpt_neox", "mistral")
LARGE_VOCAB = 65536


def wants_chunked_ce(config, requested: bool | None) -> bool:
    """On when asked; by default for supported models with a vocabulary of 64k tokens or more."""
    supported = config.model_type in CHUNKED_CE_MODELS
    if requested is None:
        return supported and config.vocab_size >= LARGE_VOCAB
    return requested and supported


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Next-token loss of `head(hidden)` against `labels` (unshifted, -100 = ignored), summed
    over supervised positions and divided by `num_items_in_batch` (else their count): the same
    number transformers' causal-LM loss gives."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_size):
        piece = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_loss, head, hidden[piece], targets[piece], use_reentrant=False)
    denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return total / denominator


def causal_lm_loss(model, inputs: dict, num_items_in_batch=None, chunk_size: int = 1024) -> torch.Tensor:
    """The model's training loss computed from its decoder's hidden states with chunked cross-entropy.
    `model` may be a peft model: its LoRA layers sit inside the decoder and head modules."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, base.base_model_prefix)
    features = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = decoder(**features).last_hidden_state
    return chunked_cross_entropy(hidden, base.get_output_embeddings(), inputs["labels"], num_items_in_batch, chunk_size)
