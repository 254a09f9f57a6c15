"""Packing is exact: a packed row gives each example the logits it gets alone, and the same loss
as padded batches; collators keep the Trainer's supervised-token count right."""

from __future__ import annotations

import pytest
import torch

from jalora.data.collate import PackCollator, PadCollator, TokenCounter
from jalora.data.prompts import Prompter, load_template
from jalora.data.records import IGNORE_INDEX, SAMPLE_DATA, load_records, tokenize_records
from jalora.model.architectures import types_with
from jalora.model.loading import load_model, load_tokenizer, resolve_source
from jalora.model.packed_attention import PACKED_SDPA, use_packed_attention
from jalora.presets import get_preset

FAMILIES = {"elyza-llama2": "llama", "open-calm": "gpt_neox", "qwen2.5": "qwen2"}


def sample_examples(model_dir, family: str, n: int, train_on_inputs: bool) -> list[dict]:
    preset = get_preset(family)
    tokenizer = load_tokenizer(resolve_source(str(model_dir)), preset)
    prompter = Prompter(load_template(preset.template), tokenizer, preset)
    examples, _ = tokenize_records(load_records(str(SAMPLE_DATA))[:n], prompter, 256, train_on_inputs)
    return examples


def test_packing_exact_types_are_the_tested_ones():
    """Llama, GPT-NeoX and Qwen2 here; Gemma 2 and 3 (with sliding windows) in tests/test_gemma.py."""
    assert set(types_with("packing_exact")) == {*FAMILIES.values(), "gemma2", "gemma3_text", "gemma3"}


@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_SDPA])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logits_and_loss_equal_unpacked(tiny_model_dir, family, attn):
    model_dir = tiny_model_dir(family)
    model = load_model(resolve_source(str(model_dir))).eval()
    model.config._attn_implementation = attn
    assert model.config.model_type == FAMILIES[family]
    examples = sample_examples(model_dir, family, 5, train_on_inputs=True)
    packed = PackCollator()(examples)
    padded = PadCollator(pad_token_id=0)(examples)
    assert packed["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    with torch.no_grad():
        packed_out = model(**packed)
        padded_out = model(**padded)
        start = 0
        for e in examples:
            n = len(e["input_ids"])
            alone = model(torch.tensor([e["input_ids"]])).logits[0]
            torch.testing.assert_close(packed_out.logits[0, start : start + n], alone, atol=1e-5, rtol=1e-4)
            start += n
    torch.testing.assert_close(packed_out.loss, padded_out.loss, atol=1e-6, rtol=1e-5)
    # and independently: the mean over examples' own next-token losses, weighted by their targets
    total, count = 0.0, 0
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        logits = model(ids).logits[0, :-1]
        targets = torch.tensor(e["labels"][1:])
        total += torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((targets != IGNORE_INDEX).sum())
    torch.testing.assert_close(packed_out.loss, total / count, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_example_attention_gives_the_block_mask_gradients(tiny_model_dir, family):
    """The per-example path is what training runs: its gradients equal those of sdpa with the
    block-diagonal mask that transformers builds from the restarting position ids."""
    model_dir = tiny_model_dir(family)
    packed = PackCollator()(sample_examples(model_dir, family, 4, train_on_inputs=False))
    grads = {}
    for attn in ("sdpa", PACKED_SDPA):
        model = load_model(resolve_source(str(model_dir)))
        assert use_packed_attention(model) and model.config._attn_implementation == PACKED_SDPA
        model.set_attn_implementation(attn)
        model(**packed).loss.backward()
        grads[attn] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads[PACKED_SDPA].keys() and grads["sdpa"]
    for name, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads[PACKED_SDPA][name], grad, atol=1e-6, rtol=1e-4)


def test_collators_mask_first_label_and_count_tokens():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
        {"input_ids": [8, 9], "labels": [IGNORE_INDEX, 9]},
    ]
    packed = PackCollator()(examples)
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert "attention_mask" not in packed and packed["use_cache"] is False  # either would switch packing off
    assert packed["cu_seq_lens_q"].tolist() == [0, 3, 5] and packed["max_length_q"] == 3
    padded = PadCollator(pad_token_id=0)(examples)
    assert padded["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]
    counter = TokenCounter()
    counter.add(padded)
    assert (counter.real, counter.processed) == (5, 6)
    counter.add(packed)
    assert (counter.real, counter.processed) == (10, 11)
    assert counter.padding_efficiency == pytest.approx(10 / 11)
