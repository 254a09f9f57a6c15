"""A toy task trained with finetune() on the Gemma stand-ins (sliding window shorter than the examples,
Gemma 2's soft-caps) is learned, and Generator's answer stops on <end_of_turn>, with <eos> a stop too."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import GEMMA_WINDOW

from jalora.generate.generator import Generator, Sampling
from jalora.train.finetune import finetune

ANSWER = "はい、富士山は日本で一番高い山で、標高は3776メートルです。"
TOPICS = ["東京", "富士山", "寿司", "新幹線", "桜", "京都", "将棋", "温泉", "俳句", "味噌汁", "相撲", "紅葉"]
SYSTEM = "あなたは短く答えるアシスタントです。"


@pytest.mark.parametrize("family", ["gemma3", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_toy_task_is_learned_and_generation_stops_on_end_of_turn(tiny_model_dir, tmp_path, family):
    data = tmp_path / "toy.jsonl"
    records = [{"instruction": f"{t}について教えて。", "output": ANSWER} for t in TOPICS * 2]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "adapter"
    record = finetune(
        base_model=str(tiny_model_dir(family)), data_path=str(data), output_dir=str(out),
        batch_size=8, micro_batch_size=8, max_steps=30, learning_rate=2e-2, val_set_size=0,
        lora_r=16, lora_dropout=0, save_steps=1000, system_prompt=SYSTEM,
    )  # fmt: skip
    assert record["preset"] == family
    generator = Generator.load(str(out))
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
