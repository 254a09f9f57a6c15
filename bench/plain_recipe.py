"""The baseline the benchmarks compare against: alpaca-lora's recipe, written out.

Per-example tokenization through `datasets.map` (one tokenizer call for prompt+answer and one
for the prompt alone, to find the mask boundary; a chat template rendered per record), then HF
Trainer with transformers' DataCollatorForSeq2Seq padding each micro-batch to its longest
example (to a multiple of 8), random order, no grouping, the model's KV cache off. Prompts are
the text jalora's Prompter gives, so both sides train on the same text."""

from __future__ import annotations

from jalora.data.prompts import Prompter
from jalora.data.records import IGNORE_INDEX, Record


def render_plainly(prompter: Prompter, instruction: str, input: str) -> str:
    """The prompt text jalora trains on, rendered as a plain script does: str.format for a template,
    one apply_chat_template call per record for a chat model (jalora reuses a verified frame)."""
    if not prompter.template.use_chat_template:
        return prompter.render(instruction, input)
    return prompter.render_chat([{"role": "user", "content": f"{instruction}\n\n{input}" if input else instruction}])


def tokenize_per_example(records: list[Record], prompter: Prompter, cutoff_len: int):
    """alpaca-lora's generate_and_tokenize_prompt, mapped one record at a time."""
    from datasets import Dataset

    tokenizer = prompter.tokenizer
    eos = tokenizer.eos_token_id

    def tokenize(text: str) -> list[int]:
        ids = tokenizer(text, truncation=True, max_length=cutoff_len, add_special_tokens=False)["input_ids"]
        if len(ids) < cutoff_len and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids

    def one(row: dict) -> dict:
        prompt = render_plainly(prompter, row["instruction"], row["input"])
        full = tokenize(prompt + row["output"])
        n_prompt = len(tokenize(prompt)) - 1  # minus the eos tokenize() appended
        return {"input_ids": full, "labels": [IGNORE_INDEX] * n_prompt + full[n_prompt:]}

    rows = [{"instruction": r.instruction, "input": r.input, "output": r.output} for r in records]
    return Dataset.from_list(rows).map(one, remove_columns=["instruction", "input", "output"])


def pad_collator(tokenizer):
    """alpaca-lora's collator: DataCollatorForSeq2Seq, padding to the longest in the micro-batch
    rounded up to a multiple of 8, labels padded with -100."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
