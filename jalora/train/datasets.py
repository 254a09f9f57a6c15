"""The data step of `finetune()` for every stage: read and validate, hold out, tokenize.

SFT reads instruction records (jalora/data/records.py, tokenized through the cache), pt plain-text
documents (jalora/data/pretrain.py), DPO/ORPO preference pairs (jalora/data/preference.py).
Each stage returns examples in the form its trainer takes.
"""

from __future__ import annotations

import time

from jalora.data.cache import tokenize_cached
from jalora.data.preference import load_pairs, tokenize_pairs
from jalora.data.pretrain import load_documents, pack_documents, tokenize_documents
from jalora.data.prompts import Prompter
from jalora.data.records import TokenizeStats, load_records, split_records
from jalora.data.stages import PREFERENCE_STAGES, STAGES
from jalora.errors import UserError

DPO_LOSS_STAGE = "dpo"


def check_stage_flags(
    stage: str, packing: bool | None, loss_type: str | None, base_adapter: str | None, lora_target_modules
) -> None:
    """Flags that belong to one stage only, or that contradict each other."""
    if stage not in STAGES:
        raise UserError(f"unknown --stage {stage!r}; choose one of: {', '.join(STAGES)}")
    if packing and stage in PREFERENCE_STAGES:
        raise UserError(f"--packing applies to --stage sft and pt; --stage {stage} pads each pair")
    if loss_type is not None and stage != DPO_LOSS_STAGE:
        raise UserError(f"--loss_type is a DPO setting (trl's DPOConfig.loss_type); --stage {stage} has none")
    if base_adapter and lora_target_modules:
        raise UserError("--lora_target_modules has no effect with --base_adapter: the adapter keeps its own targets")


def read_data(
    stage: str, data_path: str, val_data_path: str | None, val_set_size: float, seed: int, data_format: str | None
) -> tuple[list, list]:
    """(train, held-out) records of the stage's kind, all validated."""

    def read(path: str) -> list:
        if stage == "pt":
            return load_documents(path)
        if stage in PREFERENCE_STAGES:
            return load_pairs(path)
        return load_records(path, data_format)

    records = read(data_path)
    if val_data_path:
        return records, read(val_data_path)
    return split_records(records, val_set_size, seed)


def tokenize_data(
    stage: str,
    train_records: list,
    val_records: list,
    prompter: Prompter,
    cutoff_len: int,
    train_on_inputs: bool,
    add_eos_token: bool,
    packing: bool,
) -> tuple[list[dict], list[dict], TokenizeStats]:
    """(train examples, held-out examples, truncation counts of the training data)."""
    started = time.time()
    hit = False
    if stage == "pt":
        train_set, val_set = (tokenize_documents(r, prompter, cutoff_len) for r in (train_records, val_records))
        stats = TokenizeStats(kept=len(train_set))
        if packing:
            train_set, val_set = pack_documents(train_set, cutoff_len), pack_documents(val_set, cutoff_len)
    elif stage in PREFERENCE_STAGES:
        (train_set, stats), (val_set, _) = (
            tokenize_pairs(r, prompter, cutoff_len) for r in (train_records, val_records)
        )
    else:
        train_set, stats, hit = tokenize_cached(train_records, prompter, cutoff_len, train_on_inputs, add_eos_token)
        val_set, _, _ = tokenize_cached(val_records, prompter, cutoff_len, train_on_inputs, add_eos_token)
    print(f"tokenized {len(train_set) + len(val_set)} examples in {time.time() - started:.1f}s" + (" (cache)" * hit))
    if stats.truncated or stats.dropped:
        print(f"cutoff_len {cutoff_len}: {stats.truncated} records truncated (eos kept), {stats.dropped} dropped")
    return train_set, val_set, stats
