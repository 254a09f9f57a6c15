"""Gemma numerics on tiny Gemma 3 / Gemma 2 models whose sliding window (6) is shorter than the
examples: packing, the supervised-only head and chunked CE stay exact with sliding windows, soft-caps
and tied embeddings; fp16 is refused; a multimodal Gemma 3 trains its text tower only."""

from __future__ import annotations

import pytest
import tiny_gemma
import torch

from jalora.data.collate import PackCollator, PadCollator
from jalora.errors import UserError
from jalora.evaluate.memory import estimate_memory, parameter_counts, shapes
from jalora.model import architectures
from jalora.model.loading import attach_lora, compute_dtype, resolve_targets
from jalora.model.packed_attention import PACKED_EAGER, PACKED_SDPA, use_packed_attention
from jalora.presets import get_preset
from jalora.train.loss import causal_lm_loss, fused_head_weights
from jalora.train.trainer import lean_settings

MODELS = {"gemma3": tiny_gemma.gemma3_text_model, "gemma2": tiny_gemma.gemma2_model}
PACKED_IMPL = {"gemma3": PACKED_SDPA, "gemma2": PACKED_EAGER}


def with_lora(model, targets="all-linear"):
    """LoRA with random B, so that its gradients are not trivially zero."""
    torch.manual_seed(0)
    model = attach_lora(model, targets, 4, 8, 0.0, quantized=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def loss_and_grads(model, compute) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-5)
    assert a[1].keys() == b[1].keys() and a[1]
    for name, grad in a[1].items():
        torch.testing.assert_close(b[1][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_architecture_facts():
    gemma2 = tiny_gemma.gemma2_model().config
    assert architectures.attention_softcap(gemma2) == 2.0 and architectures.final_logit_softcap(gemma2) == 0.5
    assert architectures.sliding_window_layers(gemma2) == (0, 2) and architectures.tied_embeddings(gemma2)
    gemma3 = tiny_gemma.gemma3_text_model().config
    assert architectures.attention_softcap(gemma3) is None and architectures.sliding_window_layers(gemma3) == (0, 1)
    vision = tiny_gemma.gemma3_vision_model().config
    assert architectures.architecture(vision).text_tower == "model.language_model"
    assert architectures.sliding_window_layers(vision) == (0, 1)
    for config in (gemma2, gemma3, vision):
        fast = architectures.architecture(config)
        assert fast.packing_exact and fast.supervised_head and not fast.fp16_safe
    lean = lean_settings(gemma2, "none", None, None, None)
    assert lean["packing"] and lean["supervised_head"] and not lean["chunked_ce"]  # vocabulary 96
    gemma2.vocab_size = 256000
    assert lean_settings(gemma2, "none", None, None, None)["chunked_ce"]
    assert "gemma3_text" in architectures.types_with("packing_exact")
    assert not architectures.architecture(type("C", (), {"model_type": "phi3"})()).packing_exact


@pytest.mark.parametrize("name", MODELS)
def test_packed_logits_equal_each_example_alone(name):
    model = MODELS[name]()
    examples = tiny_gemma.examples()
    with torch.no_grad():
        alone = [model(torch.tensor([e["input_ids"]])).logits[0] for e in examples]
        assert use_packed_attention(model) and model.config._attn_implementation == PACKED_IMPL[name]
        packed = model(**PackCollator()(examples)).logits[0]
        padded = model(**PadCollator(pad_token_id=0)(examples)).logits  # the fallback keeps masks and caps
        start = 0
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            torch.testing.assert_close(packed[start : start + n], alone[i], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(padded[i, :n], alone[i], atol=1e-5, rtol=1e-4)
            start += n
        # the window and the caps matter on these examples: dropping them changes the logits
        model.config.sliding_window = 1000
        for layer in model.model.layers:
            layer.self_attn.sliding_window = None if layer.self_attn.sliding_window is None else 1000
            if name == "gemma2":
                layer.self_attn.attn_logit_softcapping = None
        unwindowed = model(**PackCollator()(examples)).logits[0]
    assert (unwindowed - packed).abs().max() > 1e-3


@pytest.mark.parametrize("name", MODELS)
def test_packed_loss_and_grads_equal_padded(name):
    """What training runs (LoRA, per-example packed attention) against padded batches on the
    model's stock attention (sdpa with sliding masks for Gemma 3, eager with caps for Gemma 2)."""
    model = with_lora(MODELS[name]())
    examples = tiny_gemma.examples()
    padded = loss_and_grads(model, lambda: model(**PadCollator(pad_token_id=0)(examples)).loss)
    assert use_packed_attention(model)
    packed = loss_and_grads(model, lambda: model(**PackCollator()(examples)).loss)
    assert_same(padded, packed)


@pytest.mark.parametrize("collator", [PackCollator(), PadCollator(pad_token_id=0)], ids=["packed", "padded"])
@pytest.mark.parametrize("name", [*MODELS, "gemma3-vision"])
def test_supervised_head_and_chunked_ce_equal_model_loss(name, collator):
    """Tied head, Gemma 2's final soft-cap, and the multimodal checkpoint's text tower."""
    make = MODELS.get(name, tiny_gemma.gemma3_vision_model)
    model = make()
    use_packed_attention(model)
    model = with_lora(model, resolve_targets(model, None, get_preset("elyza-llama2")))
    batch = collator(tiny_gemma.examples())
    full = loss_and_grads(model, lambda: model(**batch).loss)
    assert_same(full, loss_and_grads(model, lambda: causal_lm_loss(model, batch)))
    assert_same(full, loss_and_grads(model, lambda: causal_lm_loss(model, batch, chunk_size=5)))
    if name == "gemma2":  # the cap is applied: without it the loss differs
        model.get_base_model().config.final_logit_softcapping = None
        assert abs(float(causal_lm_loss(model, batch).detach()) - float(full[0])) > 1e-4


def test_fp16_is_refused_for_gemma(monkeypatch):
    config = tiny_gemma.gemma3_text_model().config
    with pytest.raises(UserError, match="--fp16: gemma3_text activations overflow float16"):
        compute_dtype(fp16=True, config=config)
    assert compute_dtype(bf16=True, config=config) == torch.bfloat16
    assert compute_dtype(fp16=True) == torch.float16  # other models keep fp16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert compute_dtype(config=config) == torch.float32  # a GPU without bf16: fp32, not fp16
    assert compute_dtype() == torch.float16


@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_multimodal_gemma3_trains_its_text_tower_only(targets):
    model = tiny_gemma.gemma3_vision_model()
    resolved = resolve_targets(model, targets, get_preset("elyza-llama2"))
    peft_model = with_lora(model, resolved)
    lora = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert lora and all(".language_model." in n for n in lora)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in lora)
    wanted = 7 if targets else 4  # all-linear: q/k/v/o and the MLP's three; the preset: q/k/v/o
    assert len(lora) == 2 * wanted * model.config.text_config.num_hidden_layers
    with pytest.raises(UserError, match="fc1"):
        resolve_targets(model, ["fc1"], get_preset("elyza-llama2"))
    # text-only batches train, with and without token_type_ids (all text: 0)
    batch = PadCollator(pad_token_id=0)(tiny_gemma.examples())
    peft_model.train()
    for extra in ({}, {"token_type_ids": torch.zeros_like(batch["input_ids"])}):
        loss, grads = loss_and_grads(peft_model, lambda extra=extra: peft_model(**batch, **extra).loss)
        assert torch.isfinite(loss) and all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("make", [tiny_gemma.gemma3_text_model, tiny_gemma.gemma2_model])
def test_estimate_counts_gemma_parameters(make):
    model = make()
    counts = parameter_counts(shapes(model.config))
    assert counts["linear"] + counts["other"] == sum(p.numel() for p in model.parameters())


def test_estimate_reads_the_text_tower_of_a_multimodal_gemma3():
    model = tiny_gemma.gemma3_vision_model()
    s = shapes(model.config)
    text = model.model.language_model
    assert s.hidden == model.config.text_config.hidden_size and s.vocab == model.config.text_config.vocab_size
    counts = parameter_counts(s)
    text_params = sum(p.numel() for p in text.parameters())
    vision_params = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert counts["other"] + counts["linear"] - s.frozen_extra == text_params
    assert 0.8 * vision_params <= s.frozen_extra <= vision_params
    assert estimate_memory(model.config, "4bit", 64, 2, "all-linear", 4)["lora_parameters"] > 0


def test_chunked_ce_under_bf16_autocast():
    """The fused chunks run under the Trainer's autocast (bf16 on the CPU) and still give the model's loss."""
    model = with_lora(tiny_gemma.gemma2_model())
    batch = PackCollator()(tiny_gemma.examples())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = loss_and_grads(model, lambda: model(**batch).loss)
        chunked = loss_and_grads(model, lambda: causal_lm_loss(model, batch, chunk_size=5))
    torch.testing.assert_close(chunked[0], full[0], atol=2e-2, rtol=2e-2)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in chunked[1].values())


@pytest.mark.parametrize("name", MODELS)
def test_trained_turn_token_rows_take_the_fused_head_exactly(name):
    """A base checkpoint's turn-token rows train with the adapter (peft's trainable tokens, tied to the
    head): the fused chunked loss reads them without copying the head and gives the model's loss and
    gradients, the rows' own included."""
    model = MODELS[name]()
    use_packed_attention(model)
    torch.manual_seed(0)
    model = attach_lora(model, "all-linear", 4, 8, 0.0, quantized=False, trainable_tokens=[5, 7])
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "lora_B" in name_ or "trainable_tokens_delta" in name_:
                p.normal_(std=0.1)
    head = model.get_base_model().get_output_embeddings()
    assert fused_head_weights(head)[2].tolist() == [5, 7]
    batch = PackCollator()(tiny_gemma.examples())
    full = loss_and_grads(model, lambda: model(**batch).loss)
    rows = [n for n in full[1] if "trainable_tokens_delta" in n]
    assert rows and all(full[1][n].abs().sum() > 0 for n in rows)
    assert_same(full, loss_and_grads(model, lambda: causal_lm_loss(model, batch, chunk_size=5)))
