"""Training on tiny stand-ins: the loss goes down (also after an eval pass, for 4-bit too), and the
saved adapter reloads into plain peft with the same logits."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from jalora.model.loading import attach_lora, keep_4bit_trainable, load_model, load_tokenizer, resolve_source
from jalora.presets import get_preset
from jalora.train.finetune import final_eval_loss, finetune, save_run

QUANTIZATIONS = ["none", "8bit", "4bit"]
FAMILIES = ["open-calm", "elyza-llama2"]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture
def toy_data(tmp_path) -> str:
    """A toy task: varied questions, one fixed short answer."""
    topics = ["東京", "富士山", "寿司", "新幹線", "桜", "京都", "将棋", "温泉", "俳句", "味噌汁", "相撲", "紅葉"]
    records = [
        {
            "index": str(i),
            "instruction": f"{t}について一言で答えてください。",
            "input": "",
            "output": "はい、承知しました。",
            "category": "open_qa",
        }
        for i, t in enumerate(topics * 2)
    ]
    return write_jsonl(tmp_path / "toy.jsonl", records)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_goes_down_after_eval(tiny_model_dir, toy_data, tmp_path, family, quantization):
    record = finetune(
        base_model=str(tiny_model_dir(family)),
        data_path=toy_data,
        output_dir=str(tmp_path / "out"),
        batch_size=4,
        micro_batch_size=4,
        max_steps=12,
        learning_rate=1e-2,
        val_set_size=4,
        lora_target_modules="all-linear",
        quantization=quantization,
        eval_before_training=True,  # the 4-bit CPU trap bites after an eval-mode forward
    )
    metrics = record["metrics"]
    assert metrics["eval_loss"] < 0.9 * metrics["eval_loss_before"], metrics
    assert record["preset"] == family and record["quantization"] == quantization
    assert (tmp_path / "out" / "adapter_model.safetensors").stat().st_size > 1000


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_reloads_in_plain_peft_with_same_logits(tiny_model_dir, tmp_path, family, quantization):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base_dir = str(tiny_model_dir(family))
    preset = get_preset(family)
    tokenizer = load_tokenizer(resolve_source(base_dir), preset)
    model = load_model(resolve_source(base_dir), quantization)
    model = attach_lora(model, list(preset.target_modules), 8, 16, 0.0, quantized=quantization != "none")
    torch.manual_seed(0)
    with torch.no_grad():  # stand-in for training: make every LoRA B non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    save_run(model, tokenizer, {"base_model": base_dir}, tmp_path)
    ids = torch.tensor([tokenizer("日本語の文章を生成します。")["input_ids"]])
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits

    quant = {
        "none": None,
        "8bit": BitsAndBytesConfig(load_in_8bit=True),
        "4bit": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    }[quantization]
    plain = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant)
    if quantization == "4bit":  # same CPU 4-bit kernel as training (bnb's bf16 fast path rounds differently)
        keep_4bit_trainable(plain)
    plain = PeftModel.from_pretrained(plain, str(tmp_path)).eval()
    with torch.no_grad():
        got = plain(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with plain.disable_adapter(), torch.no_grad():
        assert not torch.allclose(got, plain(ids).logits), "the adapter had no effect"


def test_all_zero_adapter_is_never_saved(tiny_model_dir, tmp_path):
    from jalora.errors import UserError

    base_dir = str(tiny_model_dir("open-calm"))
    preset = get_preset("open-calm")
    model = attach_lora(load_model(resolve_source(base_dir)), ["query_key_value"], 8, 16, 0.0, quantized=False)
    with pytest.raises(UserError, match="zero"):
        save_run(model, load_tokenizer(resolve_source(base_dir), preset), {}, tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_final_held_out_loss_reuses_the_trainers_last_step_evaluation():
    class Trainer:
        def __init__(self, history, step):
            self.state = SimpleNamespace(log_history=history, global_step=step)
            self.evaluated = 0

        def evaluate(self):
            self.evaluated += 1
            return {"eval_loss": 9.0}

    ran_at_end = Trainer([{"eval_loss": 2.0, "step": 5}, {"eval_loss": 1.5, "step": 10}, {"train_loss": 1.7}], 10)
    assert final_eval_loss(ran_at_end) == 1.5 and ran_at_end.evaluated == 0
    ran_earlier = Trainer([{"eval_loss": 2.0, "step": 5}, {"train_loss": 1.7, "step": 8}], 8)
    assert final_eval_loss(ran_earlier) == 9.0 and ran_earlier.evaluated == 1
