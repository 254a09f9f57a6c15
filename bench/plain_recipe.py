"""The baseline the benchmarks compare against: alpaca-lora's recipe, written out.

Per-example tokenization through `datasets.map` (one tokenizer call for prompt+answer and one
for the prompt alone, to find the mask boundary), then HF Trainer with a collator that pads
each micro-batch to its longest example, random order, no grouping. It renders prompts with
jalora's Prompter so both sides train on the same text.
"""

from __future__ import annotations

from jalora.data import IGNORE_INDEX, Record
from jalora.prompts import Prompter


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
        prompt = prompter.render(row["instruction"], row["input"])
        full = tokenize(prompt + row["output"])
        n_prompt = len(tokenize(prompt)) - 1  # minus the eos tokenize() appended
        return {"input_ids": full, "labels": [IGNORE_INDEX] * n_prompt + full[n_prompt:]}

    rows = [{"instruction": r.instruction, "input": r.input, "output": r.output} for r in records]
    return Dataset.from_list(rows).map(one, remove_columns=["instruction", "input", "output"])


class PadToLongest:
    """DataCollatorForSeq2Seq's behaviour for causal LM: right-pad to the longest, labels -100."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features):
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            gap = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad] * gap)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * gap)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * gap)
        return {k: torch.tensor(v) for k, v in batch.items()}
