"""A real model learns on the CPU: an embedded GGUF base (gemma-3-270m by default) before and after a short
LoRA run on the project's Japanese sample, measured on the held-out file in one process.

    python bench/real_model.py                         # gemma-3-270m, the default base
    python bench/real_model.py --base_model smollm2    # SmolLM2-135M: about 17 minutes on 2 cores
    python bench/real_model.py --max_steps 20          # a quick look

Prints the held-out loss of base and adapter, the share of held-out prompts whose greedy answer ends
on eos before max_new_tokens, and a few answers before and after.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from jalora.cli import run_quietly
from jalora.demo import HELD_OUT, short_run
from jalora.generate.generator import Generator, Sampling
from jalora.model.loading import DEFAULT_BASE_MODEL


def eos_share(generator: Generator, questions: list[tuple[str, str]], sampling: Sampling, batch: int = 8):
    """(share of answers that ended on eos before the token limit, the answers)."""
    ended, answers = 0, []
    for start in range(0, len(questions), batch):
        chunk = questions[start : start + batch]
        prompts = generator.prompter.encode([generator.prompter.render(q, x) for q, x in chunk])
        for ids in generator.generate_ids(prompts, sampling):
            ended += len(ids) < sampling.max_new_tokens  # generate_ids cuts at the first eos
            answers.append(generator.prompter.decode(ids))
    return ended / len(questions), answers


def run(
    max_steps: int = 80,
    cutoff_len: int = 512,
    max_new_tokens: int = 320,
    output_dir: str = "runs/real-model",
    show: int = 3,
    every: int = 2,
    base_model: str = DEFAULT_BASE_MODEL,
) -> dict:
    """Base vs adapter on the held-out file (loss on all of it; eos share on every `every`-th
    prompt, since greedy answers of the base model run to max_new_tokens on the CPU); returns the figures."""
    rows = [json.loads(line) for line in HELD_OUT.read_text(encoding="utf-8").splitlines()]
    questions = [(r["instruction"], r["input"]) for r in rows[::every]]
    sampling = Sampling(max_new_tokens=max_new_tokens, repetition_penalty=1.1)

    started = time.time()
    base_share, base_answers = eos_share(Generator.load(base_model=base_model), questions, sampling)
    trained_at = time.time()
    record = short_run(output_dir, max_steps, cutoff_len, base_model)
    train_minutes = (time.time() - trained_at) / 60
    tuned_share, tuned_answers = eos_share(Generator.load(output_dir), questions, sampling)

    m = record["metrics"]
    figures = {
        "held_out_loss_base": m["eval_loss_before"],
        "held_out_loss_adapter": m["eval_loss"],
        "loss_reduction": 1 - m["eval_loss"] / m["eval_loss_before"],
        "eos_share_base": base_share,
        "eos_share_adapter": tuned_share,
        "train_minutes": train_minutes,
        "total_minutes": (time.time() - started) / 60,
        "steps": m["steps"],
    }
    for (question, _), before, after in list(zip(questions, base_answers, tuned_answers))[:show]:
        print(f"\nQ: {question}\n  base:    {before.strip()[:200]}\n  adapter: {after.strip()[:200]}")
    print(
        f"\nheld-out loss      base {figures['held_out_loss_base']:.3f}  adapter {figures['held_out_loss_adapter']:.3f}"
        f"  ({100 * figures['loss_reduction']:.1f}% lower)"
    )
    print(
        f"ends on eos (<{max_new_tokens} new tokens)  base {base_share:.0%}  adapter {tuned_share:.0%}"
        f"  ({len(questions)} held-out prompts)"
    )
    print(f"training {train_minutes:.1f} min ({m['steps']} steps), whole benchmark {figures['total_minutes']:.1f} min")
    Path(output_dir, "real_model_figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    answers = [
        {"instruction": q, "input": x, "base": b, "adapter": a}
        for (q, x), b, a in zip(questions, base_answers, tuned_answers)
    ]
    Path(output_dir, "real_model_answers.json").write_text(json.dumps(answers, ensure_ascii=False, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    run_quietly(run)
