"""A toy task trained with finetune() on the Gemma stand-ins (sliding window shorter than the examples,
Gemma 2's soft-caps) is learned, and Generator's answer stops on <end_of_turn>, with <eos> a stop too.
A base checkpoint (no chat template) also trains its turn tokens' rows, and they reload in plain peft."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_models import GEMMA_WINDOW, gemma_facts

from jalora.generate.generator import Generator, Sampling
from jalora.train.finetune import finetune

ANSWER = "はい、富士山は日本で一番高い山で、標高は3776メートルです。"
TOPICS = ["東京", "富士山", "寿司", "新幹線", "桜", "京都", "将棋", "温泉", "俳句", "味噌汁", "相撲", "紅葉"]
SYSTEM = "あなたは短く答えるアシスタントです。"


def train_toy(base_model: str, tmp_path, max_steps: int = 30) -> tuple[dict, str]:
    data = tmp_path / "toy.jsonl"
    records = [{"instruction": f"{t}について教えて。", "output": ANSWER} for t in TOPICS * 2]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "adapter"
    record = finetune(
        base_model=base_model, data_path=str(data), output_dir=str(out),
        batch_size=8, micro_batch_size=8, max_steps=max_steps, learning_rate=2e-2, val_set_size=0,
        lora_r=16, lora_dropout=0, save_steps=1000, system_prompt=SYSTEM,
    )  # fmt: skip
    return record, str(out)


def it_checkpoint(tiny_model_dir, tmp_path, family: str) -> str:
    """The stand-in as an -it checkpoint: its tokenizer carries Google's chat template (the Gemma 2
    stand-in already does), so only LoRA trains. On a base checkpoint the turn rows train too, which
    on these random 64-wide stand-ins raises <end_of_turn> everywhere (see the test below); the real
    model's base path is checked by tests/test_real_model.py."""
    folder = tmp_path / f"{family}-it"
    shutil.copytree(tiny_model_dir(family), folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["chat_template"] = gemma_facts()[family]["it_chat_template"]
    config_file.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return str(folder)


@pytest.mark.parametrize("family", ["gemma3", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_toy_task_is_learned_and_generation_stops_on_end_of_turn(tiny_model_dir, tmp_path, family):
    record, out = train_toy(it_checkpoint(tiny_model_dir, tmp_path, family), tmp_path)
    assert record["preset"] == family and "trainable_tokens" not in record["lora"]
    generator = Generator.load(out)
    tok = generator.tokenizer
    end_of_turn, eos = tok.convert_tokens_to_ids(["<end_of_turn>", "<eos>"])
    assert tok.eos_token_id == end_of_turn and {end_of_turn, eos} <= set(generator.eos_ids)

    question = "温泉について教えて。"
    prompt = generator.prompter.encode([generator.prompter.render(question)])[0]
    assert prompt[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<start_of_turn>")]
    assert tok.decode(prompt[1:]) == f"<start_of_turn>user\n{SYSTEM}\n\n{question}<end_of_turn>\n<start_of_turn>model\n"
    assert len(prompt) > GEMMA_WINDOW  # the sliding-window layers see only part of the prompt
    with torch.inference_mode():
        out_ids = generator.model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=60, do_sample=False,
            eos_token_id=generator.eos_ids, pad_token_id=tok.pad_token_id,
        )[0, len(prompt) :].tolist()  # fmt: skip
    assert out_ids[-1] == end_of_turn and len(out_ids) < 60
    assert generator.answer([(question, "")], Sampling(max_new_tokens=60))[0] == ANSWER


def test_base_checkpoint_trains_its_turn_rows_and_they_reload_in_plain_peft(tiny_model_dir, tmp_path):
    """The Gemma 3 stand-in has no chat template (a -pt checkpoint): <start_of_turn> and <end_of_turn>
    rows train with the adapter, raise <end_of_turn> where each answer ends, and plain peft gives
    Generator's logits (which writes the rows into the embedding for speed, again after --compare_base)."""
    from peft import PeftModel
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from transformers import AutoModelForCausalLM

    base = str(tiny_model_dir("gemma3"))
    record, out = train_toy(base, tmp_path, max_steps=10)
    assert record["lora"]["trainable_tokens"] == ["<start_of_turn>", "<end_of_turn>"]
    generator = Generator.load(out)
    end_of_turn = generator.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    prompt = generator.prompter.encode([generator.prompter.render("温泉について教えて。")])[0]
    answer = generator.prompter.encode_after([generator.prompter.render("温泉について教えて。")], [ANSWER])[0]
    ids = torch.tensor([prompt + answer])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    with torch.no_grad():
        logits = generator.model(ids).logits[0]
        torch.testing.assert_close(plain(ids).logits[0], logits, atol=1e-5, rtol=1e-5)
        with plain.disable_adapter():
            before = plain(ids).logits[0].log_softmax(-1)
        with generator.adapter_disabled():  # --compare_base: the base's own rows, then the trained ones again
            torch.testing.assert_close(generator.model(ids).logits[0].log_softmax(-1), before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(generator.model(ids).logits[0], logits, atol=1e-5, rtol=1e-5)
    rows = [m for m in generator.model.modules() if isinstance(m, TrainableTokensLayer)]
    assert rows and all(m.merged for m in rows)  # written in again: no copy of the embedding per call
    assert logits.log_softmax(-1)[-1, end_of_turn] > before[-1, end_of_turn] + 1
