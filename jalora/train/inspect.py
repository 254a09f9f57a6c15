"""`jalora inspect`: the token ids a fine-tune would train on, before any weights are downloaded.

It takes finetune's data, template and preset flags and tokenizes with the same function
(`tokenize_records`), so what it writes is what training sees: per kept example the ids, the
labels (-100 where masked), the rendered prompt, the chat messages it came from, and the decoded
text with the supervised span marked. With --preset it needs only the tokenizer files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jalora.data.prompts import Prompter, load_template
from jalora.data.records import IGNORE_INDEX, SAMPLE_DATA, Record, load_records, tokenize_records
from jalora.errors import UserError, friendly_errors
from jalora.flags import checked_settings
from jalora.model.loading import DEFAULT_BASE_MODEL, load_tokenizer, resolve_preset, resolve_source
from jalora.outputs import write_atomic
from jalora.quiet import quiet_third_party

OPEN, CLOSE = "⟪", "⟫"  # around supervised text in `text_marked`
GREEN, RESET = "\033[32m", "\033[0m"
SHOWN_CHARS = 400
BOUNDARY_TOKENS = 3


def supervised_runs(labels: list[int]) -> list[tuple[int, int, bool]]:
    """(start, end, supervised) for each maximal run of masked or supervised positions."""
    runs: list[tuple[int, int, bool]] = []
    for i, label in enumerate(labels):
        supervised = label != IGNORE_INDEX
        if runs and runs[-1][2] == supervised:
            runs[-1] = (runs[-1][0], i + 1, supervised)
        else:
            runs.append((i, i + 1, supervised))
    return runs


def marked_pieces(prompter: Prompter, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The decoded text split where supervision starts and stops. Each piece is the difference of
    decoding longer prefixes, since decoding runs one by one would drop SentencePiece's spaces."""
    newline = prompter.preset.newline_token

    def text(end: int) -> str:
        decoded = prompter.tokenizer.decode(ids[:end], skip_special_tokens=False)
        return decoded.replace(newline, "\n") if newline else decoded

    pieces, before = [], ""
    for _, end, supervised in supervised_runs(labels):
        upto = text(end)
        pieces.append((upto[len(before) :], supervised))
        before = upto
    return pieces


def prompt_and_messages(prompter: Prompter, record: Record) -> tuple[str, list[dict] | None]:
    """The prompt of the record's last supervised turn, and for chat templates the messages it is
    rendered from (so `apply_chat_template(messages, add_generation_prompt=True) == prompt`)."""
    if not prompter.template.use_chat_template:
        return prompter.render(record.instruction, record.input), None
    if record.messages:
        last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
        before = record.messages[:last]
    else:
        before = [{"role": "user", "content": prompter.user_message(record.instruction, record.input)}]
    return prompter.render_chat(before), prompter.with_system(before)


def show(row: dict, pieces: list[tuple[str, bool]], tokenizer, colour: bool) -> None:
    """A short view: where, sizes, the tokens on both sides of the first answer's start, the text."""
    ids, labels = row["input_ids"], row["labels"]
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    before = tokenizer.convert_ids_to_tokens(ids[max(0, start - BOUNDARY_TOKENS) : start])
    after = tokenizer.convert_ids_to_tokens(ids[start : start + BOUNDARY_TOKENS])
    supervised = sum(label != IGNORE_INDEX for label in labels)
    print(f"--- {row['where']}: {len(ids)} tokens, {supervised} supervised (last: {tokenizer.decode(ids[-1:])!r})")
    print(f"    prompt ends {' '.join(map(repr, before))} | answer starts {' '.join(map(repr, after))}")
    shown, left = [], SHOWN_CHARS
    for text, is_supervised in pieces:
        text = text if len(text) <= left else text[:left] + "…"
        left -= len(text)
        shown.append((GREEN + text + RESET if colour else OPEN + text + CLOSE) if is_supervised else text)
        if left <= 0:
            break
    print("".join(shown))


@friendly_errors
def inspect(
    base_model: str = DEFAULT_BASE_MODEL,
    data_path: str = str(SAMPLE_DATA),
    output_file: str = "inspect.jsonl",
    cutoff_len: int = 512,
    train_on_inputs: bool = False,
    add_eos_token: bool = True,
    prompt_template_name: str | None = None,
    system_prompt: str | None = None,
    data_format: str | None = None,
    preset: str | None = None,
    trust_remote_code: bool = False,
    show_examples: int = 3,
    verbose: bool = False,
) -> str:
    """Write the training ids of every kept record of data_path to output_file (JSON lines) and
    show the first show_examples on the terminal, supervised text marked. The flags mean what they
    mean for finetune; with --preset, base_model may be a folder holding only tokenizer files.
    Returns output_file. --verbose shows the libraries' warnings and log lines."""
    quiet_third_party(verbose)
    checked_settings(inspect, locals())  # for Python callers: the checks the command line already made
    try:
        the_preset = resolve_preset(preset, base_model, trust_remote_code)
    except UserError as err:
        raise UserError(f"{err}; to inspect a folder with only tokenizer files, pass --preset NAME") from None
    template = load_template(prompt_template_name or the_preset.template)
    records = load_records(data_path, data_format)
    tokenizer = load_tokenizer(resolve_source(base_model), the_preset, trust_remote_code)
    prompter = Prompter(template, tokenizer, the_preset, system_prompt)
    rows, dropped, colour = [], 0, sys.stdout.isatty()
    for record in records:  # one by one, to know which record each example is; same ids as batched
        examples, stats = tokenize_records([record], prompter, cutoff_len, train_on_inputs, add_eos_token)
        dropped += stats.dropped
        for example in examples:
            pieces = marked_pieces(prompter, example["input_ids"], example["labels"])
            prompt, messages = prompt_and_messages(prompter, record)
            row = {"where": record.where, "input_ids": example["input_ids"], "labels": example["labels"]}
            row |= {"prompt": prompt, **({"messages": messages} if messages else {})}
            row["text_marked"] = "".join(OPEN + t + CLOSE if s else t for t, s in pieces)
            if len(rows) < show_examples:
                show(row, pieces, tokenizer, colour)
            rows.append(row)
    out = Path(output_file)
    write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    print(
        f"preset {the_preset.name}, template {template.name}: {len(rows)} examples written to {out}"
        + (f", {dropped} dropped (prompt alone fills --cutoff_len {cutoff_len})" if dropped else "")
    )
    return str(out)
