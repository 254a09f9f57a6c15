"""Token-exact training ids on the families' real tokenizers (the stand-ins cannot show SentencePiece's
dummy prefix as the real vocabularies have it): for every shipped template an example is
`prompt_ids + answer_ids + [eos]`, the prompt ids are those generation feeds, the answer ids those the
joint text has after them, and chat prompts are the tokenizer's own `apply_chat_template`."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from tiny_models import LLMJP3_CHAT_TEMPLATE
from transformers import AutoTokenizer

from jalora.data.prompts import Prompter, load_template, template_names
from jalora.data.records import IGNORE_INDEX, SAMPLE_DATA, Record, load_records, tokenize_records
from jalora.model.loading import load_tokenizer, resolve_source
from jalora.presets import get_preset

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "real_tokenizers"
HELD_OUT = SAMPLE_DATA.parent / "dolly_ja_heldout.jsonl"
# (fixture folder, preset, template): every shipped template on both vocabularies, llm-jp-3's chat
# template on the SentencePiece one (llm-jp-3 is SentencePiece too) and Qwen2.5's own ChatML
CASES = [
    *[("llama2-elyza", "elyza-llama2", name) for name in template_names() if name != "chat"],
    *[("qwen2.5", "generic", name) for name in template_names() if name != "chat"],
    ("llama2-elyza", "llm-jp-3", "chat"),
    ("qwen2.5", "qwen2.5", "chat"),
]
REAL_EOS = {"llama2-elyza": 2, "qwen2.5": 151645}  # </s>, <|im_end|>


@functools.cache
def real_tokenizer(folder: str, preset_name: str):
    """Loaded once per (folder, preset): Qwen's 18 MB tokenizer.json takes seconds to parse."""
    tokenizer = load_tokenizer(resolve_source(str(REAL / folder)), get_preset(preset_name))
    if preset_name == "llm-jp-3":
        tokenizer.chat_template = LLMJP3_CHAT_TEMPLATE
    return tokenizer


def real_prompter(folder: str, preset_name: str, template: str) -> Prompter:
    if not (REAL / folder).is_dir():
        pytest.skip(f"real tokenizer fixtures not found at {REAL} (they live next to the repository)")
    return Prompter(load_template(template), real_tokenizer(folder, preset_name), get_preset(preset_name))


def records() -> list[Record]:
    return load_records(str(SAMPLE_DATA)) + load_records(str(HELD_OUT))


def conversations(rows: list[Record]) -> list[Record]:
    """Two records as one two-turn conversation, with the whitespace at the edges users leave."""
    return [
        Record(
            messages=[
                {"role": "user", "content": a.instruction},
                {"role": "assistant", "content": a.output + "\n"},
                {"role": "user", "content": b.instruction},
                {"role": "assistant", "content": " " + b.output},
            ]
        )
        for a, b in zip(rows[0::2], rows[1::2])
    ]


@pytest.mark.parametrize("folder, preset_name, template", CASES)
def test_answer_ids_continue_the_joint_text_and_end_with_the_real_eos(folder, preset_name, template):
    prompter = real_prompter(folder, preset_name, template)
    tok = prompter.tokenizer
    rows = records()
    examples, stats = tokenize_records(rows, prompter, cutoff_len=100_000)
    assert stats.kept == len(rows)
    merged = 0
    for record, example in zip(rows, examples):
        prompt = prompter.render(record.instruction, record.input)
        prompt_ids = prompter.encode([prompt])[0]  # what generation feeds
        ids, labels = example["input_ids"], example["labels"]
        n = len(prompt_ids)
        assert ids[:n] == prompt_ids and labels[:n] == [IGNORE_INDEX] * n
        assert ids[n:] == labels[n:] and ids[-1] == labels[-1] == REAL_EOS[folder] == tok.eos_token_id
        answer = prompter.answer_text(record.output)
        joint = prompter.encode([prompt + answer])[0]
        if joint[:n] == prompt_ids:
            assert ids[n:-1] == joint[n:], record.where
        else:  # the tokenizer merges across the boundary: the answer's ids spell the answer, nothing added
            merged += 1
            assert tok.decode(ids[:-1]) == tok.decode(prompt_ids) + answer, record.where
    # only a prompt ending in a space can merge with the answer (`[/INST] ` + `The` is `]` `▁The`)
    print(f"{folder} {template}: {merged} of {len(rows)} answers merge with the prompt's last token")
    assert merged == 0 or prompt.endswith(" "), merged


@pytest.mark.parametrize("folder, preset_name", [("llama2-elyza", "elyza-llama2"), ("llama2-elyza", "swallow")])
def test_sentencepiece_answers_get_no_dummy_prefix(folder, preset_name):
    """The bug this guards: the answer tokenized on its own starts with SentencePiece's `▁`."""
    prompter = real_prompter(folder, preset_name, get_preset(preset_name).template)
    tok = prompter.tokenizer
    record = load_records(str(HELD_OUT))[0]  # "目を覚ますと、…"
    (example,), _ = tokenize_records([record], prompter, 100_000)
    n = len(prompter.encode([prompter.render(record.instruction)])[0])
    alone = prompter.encode([record.output], first=False)[0]
    assert tok.convert_ids_to_tokens(alone[:2]) == ["▁", "目"]  # what the old path trained on
    assert tok.convert_ids_to_tokens(example["input_ids"][n : n + 1]) == ["目"]


@pytest.mark.parametrize("folder, preset_name", [("qwen2.5", "qwen2.5"), ("llama2-elyza", "llm-jp-3")])
def test_chat_prompts_and_conversations_are_the_templates_own_tokens(folder, preset_name):
    prompter = real_prompter(folder, preset_name, "chat")
    raw = AutoTokenizer.from_pretrained(str(REAL / folder))
    raw.chat_template = prompter.tokenizer.chat_template
    rows = records()
    for record in rows[:60]:
        messages = prompter.with_system(
            [{"role": "user", "content": prompter.user_message(record.instruction, record.input)}]
        )
        assert prompter.render(record.instruction, record.input) == raw.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    chats = conversations(rows[:60])
    examples, _ = tokenize_records(chats, prompter, 100_000)
    for chat, example in zip(chats, examples):
        # the ids of the whole conversation as one text, up to the last eos; the rest is whitespace
        text = prompter.render_chat(chat.messages, add_generation_prompt=False)
        whole = prompter.encode([text])[0]
        ids = example["input_ids"]
        assert whole[: len(ids)] == ids and not prompter.tokenizer.decode(whole[len(ids) :]).strip()
