"""Chunked cross-entropy gives the model's own loss and LoRA gradients, for untied and tied heads."""

from __future__ import annotations

import pytest
import torch
from test_packing import sample_examples

from jalora.data.collate import PackCollator, PadCollator
from jalora.model.loading import attach_lora, load_config, load_model, resolve_source
from jalora.train.loss import causal_lm_loss, wants_chunked_ce


@pytest.mark.parametrize(
    "family, collator",
    [("llama3-elyza", PackCollator()), ("qwen2.5", PadCollator(pad_token_id=0)), ("open-calm", PackCollator())],
    ids=["llama3-packed", "qwen2-tied-padded", "neox-packed"],
)
def test_chunked_loss_and_grads_equal_full(tiny_model_dir, family, collator):
    model_dir = tiny_model_dir(family)
    torch.manual_seed(0)
    model = attach_lora(load_model(resolve_source(str(model_dir))), "all-linear", 4, 8, 0.0, quantized=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    batch = collator(sample_examples(model_dir, family, 4, train_on_inputs=False))

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full, full_grads = loss_and_grads(lambda: model(**batch).loss)
    chunked, chunked_grads = loss_and_grads(lambda: causal_lm_loss(model, batch, chunk_size=7))
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-7, rtol=1e-4, msg=name)
    unchunked, unchunked_grads = loss_and_grads(lambda: causal_lm_loss(model, batch))
    torch.testing.assert_close(unchunked, full, atol=1e-6, rtol=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(unchunked_grads[name], grad, atol=1e-7, rtol=1e-4, msg=name)
    supervised = int((batch["labels"][..., 1:] != -100).sum())  # the Trainer's num_items_in_batch
    scaled = causal_lm_loss(model, batch, num_items_in_batch=2 * supervised, chunk_size=7)
    torch.testing.assert_close(scaled, full / 2, atol=1e-6, rtol=1e-5)


def test_chunked_ce_default_follows_vocab_size(tiny_model_dir):
    config = load_config(resolve_source(str(tiny_model_dir("elyza-llama2"))))
    assert not wants_chunked_ce(config, None) and wants_chunked_ce(config, True)
    config.vocab_size = 128256
    assert wants_chunked_ce(config, None) and not wants_chunked_ce(config, False)
    config.model_type = "gemma2"  # its final soft-cap is applied by the loss (tests/test_gemma.py)
    assert wants_chunked_ce(config, None)
    config.model_type = "phi3"  # not in jalora/model/architectures.py: never chunked
    assert not wants_chunked_ce(config, True)
