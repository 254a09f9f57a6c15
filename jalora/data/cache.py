"""Tokenized examples cached on disk, keyed by everything that decides them.

The key hashes the records' text, the tokenizer (its full serialised vocabulary and rules,
special tokens and chat template), the template, system prompt, cutoff and masking flags and
the jalora version, so a second run with the same data and settings skips tokenization and
any change at all misses the cache. Set JALORA_CACHE_DIR to move it, or to "off" to disable it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import asdict
from itertools import chain
from pathlib import Path

import numpy as np

from jalora import __version__
from jalora.data.prompts import Prompter
from jalora.data.records import TOKENIZATION_RULES, Record, TokenizeStats, tokenize_records
from jalora.outputs import write_atomic

log = logging.getLogger(__name__)


def cache_dir() -> Path | None:
    configured = os.environ.get("JALORA_CACHE_DIR")
    if configured == "off":
        return None
    return Path(configured) if configured else Path.home() / ".cache" / "jalora" / "tokenized"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what makes a tokenizer's ids: its serialised model (fast or SentencePiece), specials, template."""
    digest = hashlib.sha256()
    if hasattr(tokenizer, "backend_tokenizer"):
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
    elif hasattr(tokenizer, "sp_model"):
        digest.update(tokenizer.sp_model.serialized_model_proto())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, type(tokenizer).__name__]
    digest.update(json.dumps([specials, getattr(tokenizer, "chat_template", None)], default=str).encode())
    return digest.hexdigest()


def cache_key(records: list[Record], prompter: Prompter, settings: dict) -> str:
    digest = hashlib.sha256()
    for r in records:
        fields = [r.instruction, r.input, r.output, r.category, r.messages]
        digest.update(json.dumps(fields, ensure_ascii=False).encode())
    meta = {
        "jalora": __version__,
        "tokenization": TOKENIZATION_RULES,
        "tokenizer": tokenizer_fingerprint(prompter.tokenizer),
        "template": asdict(prompter.template),
        "system_prompt": prompter.system_prompt,
        "preset": prompter.preset.name,
        **settings,
    }
    digest.update(json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode())
    return digest.hexdigest()[:32]


def _save(path: Path, examples: list[dict], stats: TokenizeStats) -> None:
    lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
    total = int(lengths.sum())

    def flat(key: str) -> np.ndarray:
        return np.fromiter(chain.from_iterable(e[key] for e in examples), dtype=np.int32, count=total)

    arrays = {
        "input_ids": flat("input_ids"),
        "labels": flat("labels"),
        "lengths": lengths,
        "meta": np.array(json.dumps({"stats": asdict(stats), "categories": [e["category"] for e in examples]})),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())


def _load(path: Path) -> tuple[list[dict], TokenizeStats]:
    with np.load(path) as saved:
        meta = json.loads(str(saved["meta"]))
        bounds = np.concatenate([[0], np.cumsum(saved["lengths"])]).tolist()
        ids, labels = saved["input_ids"].tolist(), saved["labels"].tolist()
    examples = [
        {"input_ids": ids[a:b], "labels": labels[a:b], "category": c}
        for a, b, c in zip(bounds[:-1], bounds[1:], meta["categories"])
    ]
    return examples, TokenizeStats(**meta["stats"])


def tokenize_cached(
    records: list[Record],
    prompter: Prompter,
    cutoff_len: int,
    train_on_inputs: bool = False,
    add_eos_token: bool = True,
) -> tuple[list[dict], TokenizeStats, bool]:
    """`tokenize_records`, from the cache when the same records were tokenized the same way before.
    Returns (examples, stats, hit)."""
    folder = cache_dir()
    if folder is None or not records:
        return (*tokenize_records(records, prompter, cutoff_len, train_on_inputs, add_eos_token), False)
    settings = {"cutoff_len": cutoff_len, "train_on_inputs": train_on_inputs, "add_eos_token": add_eos_token}
    path = folder / f"{cache_key(records, prompter, settings)}.npz"
    if path.is_file():
        try:
            return (*_load(path), True)
        except (OSError, ValueError, KeyError) as err:
            log.warning("ignoring unreadable tokenization cache %s: %s", path, err)
    examples, stats = tokenize_records(records, prompter, cutoff_len, train_on_inputs, add_eos_token)
    _save(path, examples, stats)
    return examples, stats, False
