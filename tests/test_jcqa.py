"""`jalora evaluate --tasks jcommonsenseqa` on the bundled sample in JGLUE's schema: an adapter
trained on the questions gets them all right, the file backs the printed accuracy, each score is
the log-probability of the choice's ids in the joint text, and bad files stop with one line."""

from __future__ import annotations

import contextlib
import json
import re

import pytest
import torch

from jalora.data.records import SAMPLE_DATA
from jalora.evaluate.heldout import evaluate
from jalora.evaluate.jcqa import (
    CHOICES,
    DESCRIPTION,
    answer,
    draw_shots,
    instruction,
    instruction_records,
    plain_prompt,
    read_questions,
)
from jalora.generate.generator import Generator
from jalora.train.finetune import finetune

SAMPLE = SAMPLE_DATA.with_name("jcqa_sample.jsonl")
QUESTIONS = 8  # enough to need the question to pick the answer, few enough to memorise in seconds


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> str:
    questions = read_questions(str(SAMPLE))[:QUESTIONS]
    return write_jsonl(tmp_path_factory.mktemp("jcqa") / "valid.jsonl", questions)


@pytest.fixture(scope="module")
def memorised(tiny_model_dir, tmp_path_factory):
    """The tiny model fully fine-tuned to give each sample question's answer after the plain prompt.

    Full fine-tuning, not LoRA: the random-weight tiny model learns 8 answers in 30 steps this way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_model_dir("open-calm")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    questions = read_questions(str(SAMPLE))[:QUESTIONS]
    contexts = [tokenizer(plain_prompt(q, []))["input_ids"] for q in questions]
    joint = [tokenizer(plain_prompt(q, []) + answer(q))["input_ids"] for q in questions]
    longest = max(map(len, joint))
    input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (longest - len(ids)) for ids in joint])
    labels = torch.tensor(
        [[-100] * len(c) + ids[len(c) :] + [-100] * (longest - len(ids)) for c, ids in zip(contexts, joint)]
    )
    mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in joint])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    torch.manual_seed(0)
    for _ in range(30):
        model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("memorised") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """A short LoRA run on the sample questions turned into instruction records."""
    tmp = tmp_path_factory.mktemp("jcqa-adapter")
    records = instruction_records(read_questions(str(SAMPLE))[:QUESTIONS])
    out = tmp / "adapter"
    finetune(
        base_model=str(tiny_model_dir("open-calm")),
        data_path=write_jsonl(tmp / "train.jsonl", records),
        output_dir=str(out),
        batch_size=8,
        micro_batch_size=8,
        max_steps=6,
        warmup_steps=0,
        learning_rate=2e-2,
        lora_target_modules="all-linear",
        val_set_size=0,
        eval_before_training=False,
    )
    return out


def test_model_trained_on_the_answers_gets_all_right_and_the_file_backs_the_printout(
    memorised, tiny_model_dir, valid_file, tmp_path, capsys
):
    accuracies = {}
    for name, model in (("memorised", memorised), ("untrained", tiny_model_dir("open-calm"))):
        preds = tmp_path / f"{name}.jsonl"
        result = evaluate(base_model=str(model), tasks="jcommonsenseqa", data_path=valid_file, output_file=str(preds))
        printed = capsys.readouterr().out
        rows = [json.loads(line) for line in preds.read_text(encoding="utf-8").splitlines()]
        assert [r["q_id"] for r in rows] == list(range(1, QUESTIONS + 1))
        for row in rows:
            assert row["pred"] == max(range(5), key=row["scores"].__getitem__)
            assert row["prompt_format"] == "plain" and row["num_fewshot"] == 0  # a base model: no template
        accuracies[name] = sum(r["pred"] == r["label"] for r in rows) / len(rows)
        assert accuracies[name] == result["model"]["acc"]
        assert re.search(rf"model\s+accuracy {accuracies[name]:.4f}", printed)
    assert accuracies["memorised"] == 1.0
    assert accuracies["untrained"] < 1.0


@torch.inference_mode()
def test_scores_are_log_probs_of_the_choice_in_the_joint_text(adapter, valid_file, tmp_path):
    """Batched, left-padded scoring equals one unpadded forward pass per choice (template, 2-shot);
    --compare_base scores the same prompts with the adapter switched off."""
    preds = tmp_path / "preds.jsonl"
    evaluate(
        lora_weights=str(adapter),
        tasks="jcommonsenseqa",
        data_path=valid_file,
        output_file=str(preds),
        num_fewshot=2,
        batch_size=3,
        compare_base=True,
    )
    rows = [json.loads(line) for line in preds.read_text(encoding="utf-8").splitlines()]
    assert {r["prompt_format"] for r in rows} == {"template:alpaca_ja"}  # an adapter: its run's template
    generator = Generator.load(str(adapter))
    questions = read_questions(valid_file)
    shots = draw_shots(questions, questions, 2)
    for question, shot, row in list(zip(questions, shots, rows))[:3]:
        context = generator.prompter.render(instruction(question, shot))
        [context_ids] = generator.prompter.encode([context])
        for field, disabled in (("scores", False), ("base_scores", True)):
            with generator.adapter_disabled() if disabled else contextlib.nullcontext():
                for choice, score in zip(CHOICES, row[field]):
                    [ids] = generator.prompter.encode([context + question[choice]])
                    assert ids[: len(context_ids)] == context_ids  # here the choice starts on a token boundary
                    logits = generator.model(input_ids=torch.tensor([ids])).logits[0].float()
                    logprobs = torch.log_softmax(logits[len(context_ids) - 1 : -1], dim=-1)
                    direct = logprobs.gather(1, torch.tensor(ids[len(context_ids) :])[:, None]).sum().item()
                    assert score == pytest.approx(direct, abs=1e-3)
        assert row["scores"] != row["base_scores"]


def test_fewshot_prompt_construction():
    questions = read_questions(str(SAMPLE))
    shots = draw_shots(questions, questions, 3)
    assert shots == draw_shots(questions, questions, 3)  # seeded: the same examples every run
    for question, drawn in zip(questions, shots):
        assert len(drawn) == 3 and question["q_id"] not in {s["q_id"] for s in drawn}
    assert len({tuple(s["q_id"] for s in d) for d in shots}) > 1  # not one fixed set for all

    first, second, target = questions[:3]
    prompt = plain_prompt(target, [first, second])
    assert prompt == (
        DESCRIPTION
        + "質問：雨の日に外を歩くときに差すものは？\n選択肢：\n- 傘\n- 帽子\n- 眼鏡\n- 財布\n- 時計\n"
        + "回答：傘\n\n"
        + "質問：冷蔵庫は何をするための道具？\n選択肢：\n"
        + "- 服を洗う\n- 食べ物を冷やす\n- 部屋を暖める\n- 音楽を聴く\n- 字を書く\n"
        + "回答：食べ物を冷やす\n\n"
        + "質問：朝起きて最初に鳴って人を起こすものは？\n選択肢：\n"
        + "- 冷蔵庫\n- 掃除機\n- 目覚まし時計\n- 電子レンジ\n- 本棚\n"
        + "回答："
    )
    assert DESCRIPTION == "与えられた選択肢の中から、最適な答えを選んでください。 \n\n"
    templated = instruction(target, [first])
    assert templated.startswith("与えられた選択肢の中から、最適な答えを選んでください。\n\n質問：雨の日")
    assert templated.endswith("- 本棚") and "回答：傘\n\n質問：朝起きて" in templated
    with pytest.raises(Exception, match="needs more than 3 questions"):
        draw_shots(questions, questions[:3], 3)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"q_id": 2, "question": "問い", **{c: "x" for c in CHOICES[:3]}, "choice4": "y", "label": 0}, "'choice3'"),
        ({"q_id": 2, "question": "問い", **{c: "x" for c in CHOICES}, "label": 5}, "'label' must be an integer 0-4"),
        ({"id": 2, "question": "問い", **{c: "x" for c in CHOICES}, "label": 1}, "'q_id'"),
    ],
)
def test_file_not_in_the_schema_stops_with_one_line(tmp_path, capsys, line, message):
    good = read_questions(str(SAMPLE))[0]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(SystemExit) as stop:
        evaluate(base_model="does-not-load", tasks="jcommonsenseqa", data_path=path)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}:2: field ") and message in err
