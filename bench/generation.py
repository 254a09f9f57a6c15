"""Generation speed on the CPU, each figure a ratio against a baseline run in the same process.

  PYTHONPATH=. python bench/generation.py [--threads N] [--only batch|lookup] [--batch_prompts 64] [--lookup_prompts 8]

On a shared machine use --threads 1: with more OpenMP threads than free cores every matmul
waits for a descheduled thread, and timings swing by an order of magnitude.

1. batched: 64 instructions from data/dolly_ja_sample.jsonl answered in one left-padded batch
   vs one at a time (greedy, 32 new tokens); tokens/s counts answer tokens up to eos.
2. prompt lookup: summarisation / extraction records (instruction + a passage) answered with
   --prompt_lookup_num_tokens vs plain greedy (64 new tokens); the answers must be identical.

Model: SmolLM2-135M-Instruct (real weights, embedded GGUF, base_model="smollm2"). Real weights
matter here: how much prompt lookup saves depends on how often the model copies the prompt,
which a random-weight model never does.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import fire
import torch

from jalora.generate.generator import Generator, Sampling

DATA = Path(__file__).resolve().parent.parent / "data" / "dolly_ja_sample.jsonl"
COPYING = ("summarization", "information_extraction", "closed_qa")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_batching(gen: Generator, rows: list[dict], n: int) -> None:
    prompts = gen.prompter.encode([gen.prompter.render(r["instruction"]) for r in rows if not r["input"]][:n])
    sampling = Sampling(max_new_tokens=32, repetition_penalty=1.0)
    batched, t_batch = timed(lambda: gen.generate_ids(prompts, sampling))
    single, t_single = timed(lambda: [gen.generate_ids([p], sampling)[0] for p in prompts])
    tok_batch, tok_single = sum(map(len, batched)), sum(map(len, single))
    same = sum(a == b for a, b in zip(batched, single))
    for label, tokens, seconds in (("batched", tok_batch, t_batch), ("one-by-one", tok_single, t_single)):
        print(f"{label:>10}: {len(prompts)} prompts, {tokens} tokens in {seconds:.1f}s = {tokens / seconds:.1f} tok/s")
    ratio = (tok_batch / t_batch) / (tok_single / t_single)
    print(f"batched / one-by-one tokens/s: {ratio:.2f}x  (identical answers: {same}/{len(prompts)})")


def bench_prompt_lookup(gen: Generator, rows: list[dict], n: int, lookup: int) -> None:
    chosen = [r for r in rows if r["category"] in COPYING and r["input"]][:n]
    texts = [gen.prompter.render(r["instruction"], r["input"]) for r in chosen]
    plain_s = Sampling(max_new_tokens=64, repetition_penalty=1.0)
    lookup_s = Sampling(max_new_tokens=64, repetition_penalty=1.0, prompt_lookup_num_tokens=lookup)
    gen.complete(texts[:1], lookup_s)  # warm-up of the assisted path
    plain, t_plain = timed(lambda: [gen.complete([t], plain_s)[0] for t in texts])
    looked, t_lookup = timed(lambda: [gen.complete([t], lookup_s)[0] for t in texts])
    same = sum(a == b for a, b in zip(plain, looked))
    print(f"plain greedy:  {len(texts)} prompts in {t_plain:.1f}s")
    print(f"prompt lookup: {len(texts)} prompts in {t_lookup:.1f}s (prompt_lookup_num_tokens={lookup})")
    print(f"prompt lookup speed-up: {t_plain / t_lookup:.2f}x  (identical greedy answers: {same}/{len(texts)})")


def main(threads: int | None = None, batch_prompts: int = 64, lookup_prompts: int = 8, lookup: int = 10,
         only: str = "") -> None:  # fmt: skip
    if threads:
        torch.set_num_threads(threads)
    print("command:", "PYTHONPATH=. python", " ".join(sys.argv))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    gen = Generator.load(base_model="smollm2")
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    if only in ("", "batch"):
        bench_batching(gen, rows, batch_prompts)
    if only in ("", "lookup"):
        bench_prompt_lookup(gen, rows, lookup_prompts, lookup)


if __name__ == "__main__":
    fire.Fire(main)
