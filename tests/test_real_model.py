"""Slow: the demo recipe on the embedded default, gemma-3-270m, on the CPU (run with `make test-slow`):
held-out loss drops, the adapter's greedy answers stop on `<end_of_turn>`, and a load after the first
reads the de-quantization cache in seconds."""

from __future__ import annotations

import time

import pytest

from jalora.demo import GREEDY, held_out_questions, most_repeated_sentence
from jalora.generate.generator import Generator, Sampling

MAX_NEW_TOKENS = 64


@pytest.mark.slow
def test_demo_recipe_learns_and_stops_on_end_of_turn(demo_adapter):
    run, record = demo_adapter  # its first load filled the cache (conftest's tmp dir)
    m = record["metrics"]
    assert m["eval_loss"] < 0.9 * m["eval_loss_before"], m
    assert record["base_model"] == "gemma3-270m"  # the user's name, not the cache path

    started = time.time()
    generator = Generator.load(str(run))
    assert time.time() - started < 20

    assert generator.tokenizer.eos_token == "<end_of_turn>"
    questions = held_out_questions(8)
    prompter = generator.prompter
    prompts = prompter.encode([prompter.render(q, x) for q, x in questions])
    answers = generator.generate_ids(prompts, Sampling(max_new_tokens=MAX_NEW_TOKENS, **GREEDY))
    stopped = [len(ids) < MAX_NEW_TOKENS for ids in answers]  # generate_ids cuts at the first eos id
    print(f"demo adapter: held-out loss {m['eval_loss_before']:.3f} -> {m['eval_loss']:.3f}; "
          f"{sum(stopped)}/{len(stopped)} greedy answers stopped on <end_of_turn>")  # fmt: skip
    assert sum(stopped) >= 0.75 * len(stopped), [generator.text_of(ids) for ids in answers]
    assert all(generator.text_of(ids).strip() for ids in answers)


def test_the_demo_names_the_loop_it_shows():
    """The base model's greedy continuation measured on gemma-3-270m (penalty 1.0), cut by the token limit."""
    text = "、富士山です。\n" + "富士山は、日本で最も高い山です。\n" * 2 + "富士山は、日本で最も高い山です"
    assert most_repeated_sentence(text) == ("富士山は、日本で最も高い山です", 3)
    assert most_repeated_sentence("") == ("", 0)
