"""`jalora merge`: the merged model loads with plain transformers and gives base+adapter logits,
also when the adapter was trained on a 4-bit base (dequantised first) or a GGUF base (slow)."""

from __future__ import annotations

import json

import pytest
import torch

from jalora.export.merge import merge
from jalora.model.loading import attach_lora, load_model, load_tokenizer, resolve_source
from jalora.presets import get_preset
from jalora.train.finetune import save_run

TEXT = "吾輩は猫である。名前はまだ無い。"


def random_adapter(
    base_model: str, preset_name: str, quantization: str, out_dir, trainable_tokens: list[int] | None = None
) -> torch.nn.Module:
    """An adapter with non-zero LoRA B (a stand-in for training), and changed rows of `trainable_tokens`,
    saved with its run record."""
    preset = get_preset(preset_name)
    source = resolve_source(base_model)
    tokenizer = load_tokenizer(source, preset)
    model = attach_lora(
        load_model(source, quantization), "all-linear", 8, 16, 0.0, quantized=quantization != "none",
        trainable_tokens=trainable_tokens,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
            elif "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * 0.05)
    record = dict(base_model=base_model, preset=preset_name, template=preset.template, quantization=quantization)
    save_run(model, tokenizer, record, out_dir)
    return model.eval()


def merged_logits_match(model, merged_dir, tokenizer_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
        with model.disable_adapter():
            assert not torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-3), "adapter had no effect"


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_merged_model_has_base_plus_adapter_logits(tiny_model_dir, tmp_path, capsys, quantization):
    base = str(tiny_model_dir("elyza-llama2"))
    model = random_adapter(base, "elyza-llama2", quantization, tmp_path / "adapter")
    out = tmp_path / "merged"
    merge(lora_weights=str(tmp_path / "adapter"), output_dir=str(out), max_shard_size="100KB")

    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert not list(out.glob("adapter_*"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged_logits_match(model, out, out)
    said = capsys.readouterr().out
    assert ("dequantising the 4bit base" in said) == (quantization == "4bit")


def test_merge_refuses_a_non_empty_output_dir(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        merge(base_model=str(tiny_model_dir("open-calm")), output_dir=str(tmp_path / "taken"))
    assert "not empty" in capsys.readouterr().err and (tmp_path / "taken" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_merge_onto_gguf_base(tmp_path):
    """SmolLM2 loads from GGUF, which transformers cannot save: merge copies it into a fresh model."""
    model = random_adapter("smollm2", "smollm2", "none", tmp_path / "adapter")
    merge(lora_weights=str(tmp_path / "adapter"), output_dir=str(tmp_path / "merged"))
    merged_logits_match(model, tmp_path / "merged", tmp_path / "adapter")
