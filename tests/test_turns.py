"""Multi-turn truncation and templates that trim the reply (Llama-3's `| trim`), on the stand-ins."""

from __future__ import annotations

from jalora.data.prompts import Prompter, load_template
from jalora.data.records import IGNORE_INDEX, Record, tokenize_records
from jalora.model.loading import load_tokenizer, resolve_source
from jalora.presets import detect_preset

TURNS = [
    {"role": "user", "content": "こんにちは。"},
    {"role": "assistant", "content": "こんにちは！ご用件は？"},
    {"role": "user", "content": "富士山の高さを、理由も添えて詳しく教えてください。" * 3},
    {"role": "assistant", "content": "3776メートルです。"},
]


def prompter_for(model_dir) -> Prompter:
    preset = detect_preset(str(model_dir))
    return Prompter(load_template(preset.template), load_tokenizer(resolve_source(str(model_dir)), preset), preset)


def supervised_ranges(example: dict) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of supervised positions."""
    ranges, start = [], None
    for i, label in enumerate([*example["labels"], IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            ranges.append((start, i))
            start = None
    return ranges


def supervised_spans(example: dict) -> list[list[int]]:
    return [example["input_ids"][a:b] for a, b in supervised_ranges(example)]


def test_a_cut_inside_a_later_turn_goes_back_to_the_last_complete_answer(tiny_model_dir):
    prompter = prompter_for(tiny_model_dir("qwen2.5"))
    eos = prompter.tokenizer.eos_token_id
    (whole,), _ = tokenize_records([Record(messages=TURNS)], prompter, 100_000)
    (first_start, first_end), (second_start, _) = supervised_ranges(whole)
    # inside the second user turn (the old cut put a supervised eos right after it), and inside the second answer
    for cutoff in (first_end + 5, second_start + 2):
        (example,), stats = tokenize_records([Record(messages=TURNS)], prompter, cutoff)
        assert example["input_ids"] == whole["input_ids"][:first_end], cutoff
        assert example["labels"] == whole["labels"][:first_end] and example["labels"][-1] == eos
        assert (stats.kept, stats.truncated) == (1, 1)
    # the first answer does not fit whole: it is cut and still ends with eos, as a single-turn record
    (example,), _ = tokenize_records([Record(messages=TURNS)], prompter, first_end - 2)
    assert example["input_ids"] == [*whole["input_ids"][: first_end - 3], eos] and example["labels"][-1] == eos
    # not one answer token fits: dropped
    _, stats = tokenize_records([Record(messages=TURNS)], prompter, first_start + 1)
    assert (stats.kept, stats.dropped) == (0, 1)


def test_trimming_template_trains_the_trimmed_answer(tiny_model_dir):
    prompter = prompter_for(tiny_model_dir("llama3-elyza"))  # its chat template trims every message
    tok = prompter.tokenizer
    padded = Record(instruction="日本の首都は？", output="  東京です。\n")
    (example,), _ = tokenize_records([padded], prompter, 512)
    assert [tok.decode(span[:-1]) for span in supervised_spans(example)] == ["東京です。"]
    (same,), _ = tokenize_records([Record(instruction="日本の首都は？", output="東京です。")], prompter, 512)
    assert example == same


def test_trimming_template_trains_multi_turn_records_with_edge_whitespace(tiny_model_dir):
    """These records failed with 'not prefix-stable': the reply was consumed untrimmed."""
    prompter = prompter_for(tiny_model_dir("llama3-elyza"))
    tok = prompter.tokenizer
    messages = [dict(m, content=f" {m['content']}\n") for m in TURNS]
    (example,), _ = tokenize_records([Record(messages=messages)], prompter, 100_000)
    assert [tok.decode(span[:-1]) for span in supervised_spans(example)] == [
        "こんにちは！ご用件は？",
        "3776メートルです。",
    ]
    assert all(span[-1] == tok.convert_tokens_to_ids("<|eot_id|>") for span in supervised_spans(example))
    whole = prompter.encode([prompter.render_chat(messages, add_generation_prompt=False)])[0]
    assert example["input_ids"] == whole  # the template's own rendering, token for token
