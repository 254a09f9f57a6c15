"""Prompt/response masks, eos and truncation for the two foundation families."""

from __future__ import annotations

import pytest

from jalora.data.prompts import Prompter, load_template
from jalora.data.records import IGNORE_INDEX, Record, tokenize_records
from jalora.model.loading import load_tokenizer, resolve_source
from jalora.presets import get_preset

FAMILIES = ["open-calm", "elyza-llama2", "elyza-llama2-instruct"]
RECORD = Record(instruction="日本の首都はどこですか？", input="地理の質問です。", output="東京です。")


def prompter_for(tiny_model_dir, family: str) -> Prompter:
    preset = get_preset(family.removesuffix("-instruct"))
    tokenizer = load_tokenizer(resolve_source(str(tiny_model_dir(family))), preset)
    return Prompter(load_template(preset.template), tokenizer, preset)


@pytest.mark.parametrize("family", FAMILIES)
def test_pad_is_never_eos(tiny_model_dir, family):
    tok = prompter_for(tiny_model_dir, family).tokenizer
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_masked_and_last_label_is_eos(tiny_model_dir, family):
    prompter = prompter_for(tiny_model_dir, family)
    (example,), _ = tokenize_records([RECORD], prompter, cutoff_len=512)
    prompt = prompter.render(RECORD.instruction, RECORD.input)
    prompt_ids = prompter.encode([prompt])[0]
    joint = prompter.encode([prompt + RECORD.output])[0]
    assert joint[: len(prompt_ids)] == prompt_ids
    response_ids = joint[len(prompt_ids) :]  # the answer's ids where the joint text has them
    eos = prompter.tokenizer.eos_token_id
    # ids are exactly prompt + response + eos, and the mask boundary is exact
    assert example["input_ids"] == prompt_ids + response_ids + [eos]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [eos]
    assert prompter.decode(response_ids) == RECORD.output


@pytest.mark.parametrize("family", FAMILIES)
def test_train_on_inputs_supervises_prompt(tiny_model_dir, family):
    prompter = prompter_for(tiny_model_dir, family)
    (example,), _ = tokenize_records([RECORD], prompter, cutoff_len=512, train_on_inputs=True)
    assert example["labels"] == example["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_truncation_keeps_eos(tiny_model_dir, family):
    prompter = prompter_for(tiny_model_dir, family)
    long = Record(instruction="要約してください。", output="とても長い答えです。" * 50)
    prompt_len = len(prompter.encode([prompter.render(long.instruction)])[0])
    cutoff = prompt_len + 5
    (example,), stats = tokenize_records([long], prompter, cutoff_len=cutoff)
    eos = prompter.tokenizer.eos_token_id
    assert len(example["input_ids"]) == cutoff
    assert example["input_ids"][-1] == eos and example["labels"][-1] == eos
    assert example["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert all(label != IGNORE_INDEX for label in example["labels"][prompt_len:])
    assert (stats.truncated, stats.dropped) == (1, 0)


def test_prompt_longer_than_cutoff_is_dropped_and_counted(tiny_model_dir):
    prompter = prompter_for(tiny_model_dir, "open-calm")
    records = [RECORD, Record(instruction="長い指示" * 200, output="はい。")]
    fits = len(prompter.encode([prompter.render(RECORD.instruction, RECORD.input)])[0]) + 10
    examples, stats = tokenize_records(records, prompter, cutoff_len=fits)
    assert len(examples) == 1 and (stats.kept, stats.dropped) == (1, 1)


def test_exactly_one_bos_for_llama(tiny_model_dir):
    prompter = prompter_for(tiny_model_dir, "elyza-llama2")
    bos = prompter.tokenizer.bos_token_id
    (example,), _ = tokenize_records([RECORD], prompter, cutoff_len=512)
    assert example["input_ids"][0] == bos and example["input_ids"].count(bos) == 1
    # open-calm adds none: its bos equals eos and must not open the prompt
    neox = prompter_for(tiny_model_dir, "open-calm")
    (example,), _ = tokenize_records([RECORD], neox, cutoff_len=512)
    assert example["input_ids"][0] != neox.tokenizer.eos_token_id


def test_padding_never_masks_eos(tiny_model_dir):
    """Collated batch: pad positions are masked, the eos of the shorter example is still a label."""
    from jalora.data.collate import PadCollator

    prompter = prompter_for(tiny_model_dir, "elyza-llama2-instruct")  # its tokenizer shipped pad == eos
    short = Record(instruction="はい", output="はい。")
    examples, _ = tokenize_records([short, RECORD], prompter, cutoff_len=512)
    batch = PadCollator(prompter.tokenizer.pad_token_id)(examples)
    eos = prompter.tokenizer.eos_token_id
    n = len(examples[0]["input_ids"])
    assert batch["labels"][0, n - 1] == eos
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert (batch["input_ids"][0, n:] != eos).all()
