"""`jalora estimate`: parameter and LoRA counts from the config match real models exactly; the
weight bytes of a loaded 4-bit model match the prediction; the CLI prints a verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from jalora.cli import main
from jalora.evaluate.memory import NF4_BYTES, estimate_memory, lora_parameters, parameter_counts, shapes
from jalora.model.loading import attach_lora, load_config, load_model, resolve_source

SEED_CONFIGS = Path(__file__).resolve().parent.parent / "bench" / "model_configs"


@pytest.mark.parametrize("family", ["elyza-llama2", "open-calm", "qwen2.5", "llama3-elyza"])
def test_counts_match_the_model(tiny_model_dir, family):
    model_dir = str(tiny_model_dir(family))
    s = shapes(load_config(resolve_source(model_dir)))
    model = load_model(resolve_source(model_dir))
    counts = parameter_counts(s)
    assert counts["linear"] + counts["other"] == sum(p.numel() for p in model.parameters())
    targets = sorted(s.linears)[:2]
    peft_model = attach_lora(model, targets, 8, 16, 0.0, quantized=False)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_parameters(s, targets, 8) == trainable


def test_4bit_weight_bytes_match_a_loaded_model(tiny_model_dir):
    model_dir = str(tiny_model_dir("elyza-llama2"))
    config = load_config(resolve_source(model_dir))
    model = attach_lora(load_model(resolve_source(model_dir), "4bit"), ["q_proj"], 8, 16, 0.0, quantized=True)
    measured = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        measured += p.numel() * p.element_size()
        quant_state = getattr(p, "quant_state", None)
        if quant_state is not None:  # absmax (and its own state with double quantization)
            measured += quant_state.absmax.numel() * quant_state.absmax.element_size()
            if quant_state.state2 is not None:
                measured += quant_state.state2.absmax.numel() * 4
    predicted = estimate_memory(config, "4bit", lora_target_modules=["q_proj"])["weights"]
    assert predicted == pytest.approx(measured, rel=0.02)
    assert NF4_BYTES < 0.52


def test_memory_levers_shrink_the_estimate():
    config = load_config(resolve_source(str(SEED_CONFIGS / "llama3-elyza-jp-8b")))
    full = estimate_memory(config, "4bit", 1024, 4, "all-linear", gradient_checkpointing=False, chunked_ce=False)
    lean = estimate_memory(config, "4bit", 1024, 4, "all-linear")
    assert lean["gradient_checkpointing"] and lean["chunked_ce"]  # the defaults for 4-bit and a 128k vocab
    assert lean["activations"] < full["activations"] / 4 and lean["logits"] < full["logits"] / 3
    assert full["parameters"] == pytest.approx(8.03e9, rel=0.005)  # Llama-3-8B's published size


def estimate_cli(*args: str) -> None:
    main(["estimate", *args])


def test_estimate_cli_prints_breakdown_and_verdict(capsys):
    model = str(SEED_CONFIGS / "elyza-llama2-7b")
    estimate_cli(model, "--quantization", "4bit", "--gpu_gb", "24")
    out = capsys.readouterr().out
    assert "6.74B parameters" in out and "q_proj,k_proj,v_proj,o_proj" in out  # preset detected from the path
    for line in ("weights", "LoRA + optimizer", "activations", "logits / loss"):
        assert line in out
    assert "fits on a 24 GB card" in out
    estimate_cli(model, "--quantization", "none", "--gpu_gb", "8")
    assert "does NOT fit on a 8 GB card" in capsys.readouterr().out


def test_estimate_cli_user_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        estimate_cli(str(tmp_path / "missing"))
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err
    model = str(SEED_CONFIGS / "open-calm-7b")
    with pytest.raises(SystemExit):
        estimate_cli(model, "--lora_target_modules", "q_proj")
    assert "query_key_value" in capsys.readouterr().err


def test_dpo_estimate_counts_two_sequences_per_pair():
    config = load_config(resolve_source(str(SEED_CONFIGS / "elyza-llama2-7b")))
    sft = estimate_memory(config, "4bit", 512, 2, "all-linear", stage="sft")
    dpo = estimate_memory(config, "4bit", 512, 2, "all-linear", stage="dpo")
    same_tokens = estimate_memory(config, "4bit", 1024, 2, "all-linear", stage="sft", chunked_ce=True)
    assert dpo["weights"] == sft["weights"] and dpo["activations"] == same_tokens["activations"]
    assert dpo["activations"] > 1.5 * sft["activations"] and dpo["chunked_ce"]
