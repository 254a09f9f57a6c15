"""Tokenization speed: 15,000 dolly-sized records, jalora (batched, then from its cache) against
alpaca-lora's per-example `datasets.map`, with SmolLM2's fast tokenizer and chat template.

The project's Japanese sample is replicated to `n` records (each copy numbered, so no two
prompts are identical).

    PYTHONPATH=. python bench/tokenize_speed.py [--n 15000]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import fire
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_recipe import render_plainly, tokenize_per_example  # noqa: E402

from jalora.data.cache import tokenize_cached  # noqa: E402
from jalora.data.prompts import Prompter, load_template  # noqa: E402
from jalora.data.records import load_records  # noqa: E402
from jalora.model.loading import load_tokenizer, resolve_source  # noqa: E402
from jalora.presets import get_preset  # noqa: E402

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "dolly_ja_sample.jsonl"


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main(n: int = 15000, cutoff_len: int = 512):
    os.environ["JALORA_CACHE_DIR"] = tempfile.mkdtemp(prefix="jalora-tokcache-")
    sample = load_records(str(SAMPLE))
    records = [replace(r, instruction=f"{i // len(sample)}. {r.instruction}") for i, r in enumerate(sample * 50)][:n]
    preset = get_preset("smollm2")
    prompter = Prompter(load_template(preset.template), load_tokenizer(resolve_source("smollm2"), preset), preset)
    print(f"{len(records)} records, load average {psutil.getloadavg()}")

    (examples, _, hit), first = timed(lambda: tokenize_cached(records, prompter, cutoff_len))
    assert not hit
    (again, _, hit), cached = timed(lambda: tokenize_cached(records, prompter, cutoff_len))
    assert hit and again == examples
    plain, per_example = timed(lambda: tokenize_per_example(records, prompter, cutoff_len))
    tokens = sum(len(e["input_ids"]) for e in examples)
    print(f"tokens: jalora {tokens}, per-example {sum(len(ids) for ids in plain['input_ids'])}")
    print(f"per-example datasets.map : {per_example:7.2f} s")
    print(f"jalora batched (cold)    : {first:7.2f} s   {per_example / first:5.1f}x")
    print(f"jalora cache hit         : {cached:7.2f} s   {per_example / cached:5.1f}x")
    print(f"load average after {psutil.getloadavg()}")
    same = all(
        prompter.render(r.instruction, r.input) == render_plainly(prompter, r.instruction, r.input) for r in records
    )
    print(f"prompt text identical on both sides for all {len(records)} records: {same}")


if __name__ == "__main__":
    fire.Fire(main)
