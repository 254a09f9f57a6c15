"""Cross-entropy without the full logits tensor.

The head is applied only to positions whose next token is supervised: prompt tokens never
get logits, which saves the head's compute and memory for them (the head of a small model is
a large share of its FLOPs). For a 128k vocabulary the supervised logits (tokens × vocab,
upcast to fp32, plus their gradient) are still the largest tensor of a LoRA step, so with a
chunk size they are built a chunk at a time: at most one chunk of logits is alive. For a plain
linear head each chunk's gradient is computed in the forward pass, while its logits are at hand
(`_FusedHeadLoss`, the "fused linear cross-entropy" of Liger-Kernel and others): the backward pass
then only scales the stored gradient, so chunking costs no recomputation of the head, which on
gemma-3-270m is most of the model's FLOPs; a head whose turn-token rows train (peft's trainable
tokens) takes the same path. Any other head (a LoRA-wrapped one) is checkpointed per chunk and
recomputed instead.

Which models may take this path is a fact of their architecture (jalora/model/architectures.py):
the head must be all there is between the last hidden state and the logits, apart from a final
soft-cap (Gemma 2), which is applied here exactly as the model's forward applies it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from peft.utils.other import TrainableTokensWrapper
from torch.utils.checkpoint import checkpoint

from jalora.data.records import IGNORE_INDEX
from jalora.model.architectures import architecture, final_logit_softcap, text_config

LARGE_VOCAB = 65536


def supports_supervised_head(config) -> bool:
    return architecture(config).supervised_head


def wants_chunked_ce(config, requested: bool | None) -> bool:
    """On when asked; by default for supported models with a vocabulary of 64k tokens or more."""
    if requested is None:
        return supports_supervised_head(config) and text_config(config).vocab_size >= LARGE_VOCAB
    return requested and supports_supervised_head(config)


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None):
    logits = head(hidden)
    if softcap is not None:  # in the head's dtype, in the order the model's forward uses
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class _FusedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of `cap(hidden @ W.T)` with its gradients computed chunk by chunk in the
    forward pass; W is `weight` with the rows `rows` replaced by `row_weight` when given (peft's
    trainable tokens, see `fused_head_weights`). torch has no fused linear + cross-entropy; written
    here because the checkpointed alternative recomputes the head, and only the gradients w.r.t.
    `hidden`, `row_weight` (and `weight` where it trains) are ever needed from each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, row_weight, rows, targets, chunk_size: int, softcap: float | None):
        need_hidden, need_weight, need_rows = ctx.needs_input_grad[:3]
        want_grads = need_hidden or need_weight or need_rows
        ctx.dtypes = weight.dtype, row_weight.dtype if row_weight is not None else None
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_rows = torch.zeros_like(row_weight, dtype=torch.float32) if need_rows else None
        row_change = row_weight - weight[rows] if rows is not None else None
        for start in range(0, len(targets), chunk_size):
            piece = slice(start, start + chunk_size)
            h, t = hidden[piece], targets[piece]
            logits = F.linear(h, weight)
            if rows is not None:
                logits[:, rows] = F.linear(h, row_weight)
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            logits = logits.float()
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not want_grads:
                continue
            grad = torch.exp(logits - log_norm[:, None])  # d loss / d logits: softmax minus the target
            grad[torch.arange(len(t)), t] -= 1
            if softcap is not None:
                grad *= 1 - capped.float().square()
            grad = grad.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[piece] = grad @ weight
                if rows is not None:
                    grad_hidden[piece] += grad[:, rows] @ row_change
            if grad_weight is not None:
                grad_weight += (grad.T @ h).float()
            if grad_rows is not None:
                grad_rows += (grad[:, rows].T @ h).float()
        if grad_weight is not None and rows is not None:
            grad_weight[rows] = 0  # those rows of `weight` are not used
        ctx.save_for_backward(grad_hidden, grad_weight, grad_rows)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        weight_dtype, rows_dtype = ctx.dtypes
        grad_hidden, grad_weight, grad_rows = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None
        grad_weight = (grad_weight * grad_total).to(weight_dtype) if grad_weight is not None else None
        grad_rows = (grad_rows * grad_total).to(rows_dtype) if grad_rows is not None else None
        return grad_hidden, grad_weight, grad_rows, None, None, None, None


def fused_head_weights(head: torch.nn.Module):
    """(weight, row_weight, rows) of a head `_FusedHeadLoss` can compute, or None: a plain linear head
    without bias, or one wrapped by peft's trainable tokens (a tied head whose turn-token rows train,
    jalora/model/lora.py) with one active adapter, unmerged. peft's own forward of that wrapper copies
    the whole 262k-row matrix to replace two rows, on every call."""
    if type(head) is torch.nn.Linear and head.bias is None:
        return head.weight, None, None  # nothing replaced
    head = head.token_adapter if isinstance(head, TrainableTokensWrapper) else head
    if not isinstance(head, TrainableTokensLayer) or head.merged or head.disable_adapters:
        return None
    base, active = head.base_layer, head.active_adapters
    if type(base) is not torch.nn.Linear or base.bias is not None or len(active) != 1:
        return None
    rows = torch.tensor(head.token_indices[active[0]], device=base.weight.device)
    return base.weight, head.trainable_tokens_delta[active[0]], rows


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Next-token loss of `head(hidden)` (soft-capped if `softcap`) against `labels` (unshifted,
    -100 = ignored), summed over supervised positions and divided by `num_items_in_batch` (else
    their count): the same number transformers' causal-LM loss gives. `chunk_size` None: one
    piece, nothing recomputed."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = targets[keep]
    if chunk_size is None:
        return _chunk_loss(head, hidden, targets, softcap) / _denominator(num_items_in_batch, keep)
    fused = fused_head_weights(head)
    if fused is not None:
        total = _FusedHeadLoss.apply(hidden, *fused, targets, chunk_size, softcap)
        return total / _denominator(num_items_in_batch, keep)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_size):
        piece = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_loss, head, hidden[piece], targets[piece], softcap, use_reentrant=False)
    return total / _denominator(num_items_in_batch, keep)


def _denominator(num_items_in_batch, keep: torch.Tensor):
    return num_items_in_batch if num_items_in_batch is not None else keep.sum()


def causal_lm_loss(model, inputs: dict, num_items_in_batch=None, chunk_size: int | None = None) -> torch.Tensor:
    """The model's training loss, with the head applied to supervised positions only (in chunks if given).
    `model` may be a peft model: its LoRA layers sit inside the decoder and head modules. The
    decoder of a multimodal checkpoint (Gemma3ForConditionalGeneration) takes the same inputs,
    `token_type_ids` included, and returns the text tower's last hidden state."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, base.base_model_prefix)
    features = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = decoder(**features).last_hidden_state
    head = base.get_output_embeddings()
    cap = final_logit_softcap(base.config)
    return chunked_cross_entropy(hidden, head, inputs["labels"], num_items_in_batch, chunk_size, cap)
