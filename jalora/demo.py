"""`make demo`: what a short LoRA run does to gemma-3-270m (the embedded default), on the CPU.

1. The base model, greedy at repetition_penalty 1.0, continues `日本で一番高い山は` with one sentence
   over and over: the repetition that alpaca-lora's open-calm recipe fights with a penalty of 5.0.
2. Asked held-out questions in Gemma's turns, the base model talks on to the token limit; after 24
   LoRA steps on the bundled Japanese sample (under 3 minutes on 2 cores; the turn tokens' rows train
   too, see jalora/model/lora.py) the adapter answers and stops on `<end_of_turn>`.
3. The held-out loss before and after the run.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter

from jalora.cli import run_quietly
from jalora.data.records import SAMPLE_DATA
from jalora.generate.generator import Generator, Sampling
from jalora.model.loading import DEFAULT_BASE_MODEL
from jalora.quiet import quiet_third_party
from jalora.train.finetune import finetune

HELD_OUT = SAMPLE_DATA.with_name("dolly_ja_heldout.jsonl")
REPEAT_PROMPT = "日本で一番高い山は"
GREEDY = dict(do_sample=False, repetition_penalty=1.0)  # the decoding that shows the base model's loop
DEMO_STEPS = 24


def held_out_questions(n: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in HELD_OUT.read_text(encoding="utf-8").splitlines()]
    short = [r for r in rows if not r["input"] and len(r["output"]) < 80]
    return [(r["instruction"], r["input"]) for r in short[:n]]


def most_repeated_sentence(text: str) -> tuple[str, int]:
    """The sentence (up to 。！？ or a line end, without that mark) that occurs most often in `text`,
    and its count; a last sentence cut by the token limit counts too."""
    sentences = [s.strip() for s in re.split(r"[。！？\n]", text) if s.strip()]
    if not sentences:
        return "", 0
    return Counter(sentences).most_common(1)[0]


def show_repetition(generator: Generator, max_new_tokens: int) -> None:
    sampling = Sampling(max_new_tokens=max_new_tokens, **GREEDY)
    (text,) = generator.complete([REPEAT_PROMPT], sampling)
    sentence, count = most_repeated_sentence(text)
    print(f"\n=== 1. base model, greedy decoding, repetition_penalty 1.0 ===\n{REPEAT_PROMPT}{text}")
    if count > 1:
        print(f"-> a repetition loop: 「{sentence}」 {count} times in {max_new_tokens} tokens")


def show_answers(title: str, generator: Generator, questions: list[tuple[str, str]], max_new_tokens: int) -> float:
    """Greedy answers in the model's prompt format; returns the share that stopped on end of turn."""
    sampling = Sampling(max_new_tokens=max_new_tokens, **GREEDY)
    prompter = generator.prompter
    ids = generator.generate_ids(prompter.encode([prompter.render(q, x) for q, x in questions]), sampling)
    eos = generator.tokenizer.eos_token
    print(f"\n=== {title} ===")
    for (question, _), answer in zip(questions, ids):
        # generate_ids cuts each answer at its first eos id: a shorter answer stopped there
        how = f"stopped on {eos} after {len(answer)} tokens" if len(answer) < max_new_tokens else "ran to the limit"
        print(f"Q: {question}\nA: {generator.text_of(answer).strip()}\n   [{how}]\n")
    return sum(len(a) < max_new_tokens for a in ids) / len(ids)


def short_run(output_dir: str, max_steps: int, cutoff_len: int = 256, base_model: str = DEFAULT_BASE_MODEL) -> dict:
    """The CPU recipe of `make demo` and bench/real_model.py: LoRA on the sample, scored on the held-out file."""
    return finetune(
        base_model=base_model,
        data_path=str(SAMPLE_DATA),
        val_data_path=str(HELD_OUT),
        output_dir=output_dir,
        batch_size=4,
        micro_batch_size=4,
        max_steps=max_steps,
        learning_rate=1e-3,
        cutoff_len=cutoff_len,
        lora_r=16,
        lora_alpha=32,
        save_steps=max_steps,
        eval_steps=max_steps,
        logging_steps=10,
        overwrite_output_dir=True,
    )


def demo(
    output_dir: str = "demo-out",
    max_steps: int = DEMO_STEPS,
    questions: int = 3,
    max_new_tokens: int = 64,
    verbose: bool = False,
) -> None:
    """The base model's loop and answers, a short LoRA run with held-out loss before/after, the adapter's answers.
    --verbose shows the libraries' warnings and progress bars."""
    quiet_third_party(verbose)
    started = time.time()
    asked = held_out_questions(questions)
    base = Generator.load(base_model=DEFAULT_BASE_MODEL)
    show_repetition(base, max_new_tokens)
    show_answers(f"2. base model ({DEFAULT_BASE_MODEL}) in its chat turns", base, asked, max_new_tokens)
    del base
    record = short_run(output_dir, max_steps)
    show_answers(f"3. after {max_steps} LoRA steps", Generator.load(output_dir), asked, max_new_tokens)
    m = record["metrics"]
    drop = 100 * (1 - m["eval_loss"] / m["eval_loss_before"])
    print(f"held-out loss: {m['eval_loss_before']:.3f} -> {m['eval_loss']:.3f} ({drop:.0f}% lower)")
    print(f"adapter in {output_dir}/; total {time.time() - started:.0f} s")
    print(f"try: python generate.py --lora_weights {output_dir} --prompt '日本で一番高い山は？'")


if __name__ == "__main__":
    run_quietly(demo)
