"""After a tiny training run: loss plot, model card and TensorBoard logs exist and are right;
`jalora evaluate` numbers equal a direct per-example computation with plain transformers + peft."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch

from jalora.data.records import load_records, tokenize_records
from jalora.evaluate.heldout import evaluate
from jalora.generate.generator import Generator
from jalora.train.finetune import finetune

TOPICS = ["東京", "富士山", "寿司", "新幹線", "桜", "京都", "将棋", "温泉", "俳句", "味噌汁", "相撲", "紅葉"]
CATEGORIES = ["open_qa", "brainstorming", "closed_qa"]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def dolly_rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "index": str(i),
            "instruction": f"{TOPICS[i % len(TOPICS)]}について{'一言で' * (i % 3)}教えてください。",
            "input": "参考: 日本の話です。" if i % 4 == 0 else "",
            "output": "はい、承知しました。" + "詳しく説明します。" * (i % 3),
            "category": CATEGORIES[i % len(CATEGORIES)],
        }
        for i in range(offset, offset + n)
    ]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """One short real training run (with an eval before, during and after) logging to TensorBoard."""
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "adapter"
    finetune(
        base_model=str(tiny_model_dir("open-calm")),
        data_path=write_jsonl(tmp / "train.jsonl", dolly_rows(16)),
        output_dir=str(out),
        batch_size=4,
        micro_batch_size=4,
        max_steps=6,
        eval_steps=3,
        logging_steps=1,
        learning_rate=1e-2,
        val_set_size=4,
        lora_target_modules="all-linear",
        report_to="tensorboard",
    )
    return out


def test_loss_plot_card_and_tensorboard_after_training(run_dir):
    from matplotlib.image import imread

    record = json.loads((run_dir / "jalora.json").read_text(encoding="utf-8"))
    metrics, losses = record["metrics"], record["losses"]
    assert [step for step, _ in losses["train"]] == list(range(1, 7))
    assert [step for step, _ in losses["eval"]] == [0, 3, 6]
    assert losses["eval"][0][1] == metrics["eval_loss_before"] and losses["eval"][-1][1] == metrics["eval_loss"]
    assert losses["eval"][-1][1] < losses["eval"][0][1]
    image = imread(run_dir / "loss.png")
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0  # a real, non-blank PNG

    card = (run_dir / "README.md").read_text(encoding="utf-8")
    assert record["base_model"] in card and "![train and eval loss](loss.png)" in card
    assert f"{metrics['eval_loss']:.4g}" in card and "| learning_rate | 0.01 |" in card
    assert "Model Card for Model ID" not in card  # peft's stub is replaced

    # one event file under the output dir holds every evaluation, the one before training included
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = run_dir.glob("runs/*/events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload()
    assert [e.step for e in scalars.Scalars("eval/loss")] == [0, 3, 6]


def test_card_snippet_loads_the_adapter_with_plain_peft(run_dir):
    """The card's Python block, run as is, gives the same logits as jalora's Generator."""
    card = (run_dir / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    scope: dict = {}
    exec(code, scope)
    generator = Generator.load(lora_weights=str(run_dir))
    ids = torch.tensor([generator.prompter.encode([generator.prompter.render("桜について教えて。")])[0]])
    with torch.no_grad():
        torch.testing.assert_close(scope["model"].eval()(ids).logits, generator.model(ids).logits)


def test_held_out_numbers_equal_direct_computation(run_dir, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    held_out = write_jsonl(tmp_path / "held_out.jsonl", dolly_rows(7, offset=100))
    result = evaluate(lora_weights=str(run_dir), data_path=held_out, compare_base=True, batch_size=3)

    # direct: one example at a time through plain transformers + peft, HF's own mean loss × token count
    generator = Generator.load(lora_weights=str(run_dir))
    examples, _ = tokenize_records(load_records(held_out), generator.prompter, 512)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("open-calm"))).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("open-calm"))), str(run_dir)
    ).eval()
    for name, model in (("adapter", adapted), ("base", base)):
        sums: dict[str, list[float]] = {}
        for example in examples:
            labels = torch.tensor([example["labels"]])
            with torch.no_grad():
                loss = model(torch.tensor([example["input_ids"]]), labels=labels).loss.item()
            n = int((labels[0, 1:] != -100).sum())
            for group in ("overall", example["category"]):
                total = sums.setdefault(group, [0.0, 0])
                total[0] += loss * n
                total[1] += n
        for group, (nll, tokens) in sums.items():
            got = result[name]["overall" if group == "overall" else "by_category"]
            got = got if group == "overall" else got[group]
            assert got["tokens"] == tokens
            assert got["loss"] == pytest.approx(nll / tokens, rel=1e-5)
            assert got["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert set(result["adapter"]["by_category"]) == set(CATEGORIES)
    assert result["adapter"]["overall"]["examples"] == 7
    assert result["adapter"]["overall"]["loss"] < result["base"]["overall"]["loss"]

    record = json.loads((run_dir / "jalora.json").read_text(encoding="utf-8"))
    assert record["evaluations"][held_out]["adapter"] == json.loads(json.dumps(result["adapter"]))
    assert f"`{held_out}`" in (run_dir / "README.md").read_text(encoding="utf-8")


def test_elyza_tasks_csv_answers_for_adapter_and_base(run_dir, tmp_path):
    tasks = tmp_path / "tasks.csv"
    rows = [
        {"input": "次の文を要約して。\n晴れ、明日は雨。", "output": "晴れのち雨。", "eval_aspect": "簡潔さ, 正確さ"},
        {"input": "俳句を一つ作ってください。", "output": "古池や", "eval_aspect": "- 五七五であること"},
        {"input": "温泉について教えて。", "output": "日本各地にあります。", "eval_aspect": ""},
    ]
    with tasks.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["input", "output", "eval_aspect"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "answers.jsonl"
    evaluate(
        lora_weights=str(run_dir), tasks="elyza-tasks-100", data_path=str(tasks), output_file=str(out),
        compare_base=True, max_new_tokens=6, batch_size=2,
    )  # fmt: skip
    answered = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [{k: r[k] for k in ("input", "output", "eval_aspect")} for r in answered] == rows

    from jalora.generate.generator import Sampling

    generator = Generator.load(lora_weights=str(run_dir))
    expected = generator.answer([(r["input"], "") for r in rows], Sampling(max_new_tokens=6))
    with generator.model.disable_adapter():
        expected_base = generator.answer([(r["input"], "") for r in rows], Sampling(max_new_tokens=6))
    assert [r["response"] for r in answered] == expected
    assert [r["base_response"] for r in answered] == expected_base


def test_bad_tasks_file_and_unknown_task_stop_with_one_line(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.csv"  # record 1 spans lines 2-3 (quoted newline); record 2, line 4, has no input
    bad.write_text('input,output,eval_aspect\n"一行目\n二行目",答え,\n,答え,観点\n', encoding="utf-8")
    for kwargs, message in (
        ({"tasks": "elyza-tasks-100", "data_path": str(bad)}, f"error: {bad}:4: field 'input' is missing or empty"),
        ({"tasks": "jglue"}, "error: unknown --tasks 'jglue'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            evaluate(lora_weights=str(run_dir), **kwargs)
        assert exit_info.value.code == 2 and capsys.readouterr().err.startswith(message)
