"""Slow, with llama.cpp itself (llama-cpp-python, the `gguf-check` extra that `make test-slow` installs):
the exported GGUF gives transformers' logits for every exported architecture, and a SmolLM2 adapter
answers held-out questions through llama.cpp's chat completion with generate.py's first tokens."""

from __future__ import annotations

import json
import time

import pytest
import torch
from test_export import random_adapter

from jalora.export.gguf import export

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is absent: pip install -e '.[gguf-check]'")

PREFIX_TOKENS = 8
TEXT = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"


def llama(path: str, logits_all: bool = False):
    return llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, logits_all=logits_all, verbose=False, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama3-elyza", "qwen2.5", "open-calm"])  # Llama (GQA), Qwen2, GPT-NeoX
def test_llama_cpp_logits_match_transformers(tiny_model_dir, tmp_path, family):
    """Rope row order, fused qkv order, biases, tied heads: any layout slip changes every logit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_model_dir(family)
    model = random_adapter(str(base), family, "none", tmp_path / "run")
    path = export(lora_weights=str(tmp_path / "run"), output_dir=str(tmp_path / "gguf"))
    ids = AutoTokenizer.from_pretrained(str(base))(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
        base_logits = AutoModelForCausalLM.from_pretrained(str(base))(torch.tensor([ids])).logits[0]
    runner = llama(path, logits_all=True)
    runner.eval(ids)
    got = torch.tensor(runner.scores[: len(ids)], dtype=torch.float32)
    error = (got - expected).abs().max().item()
    adapter_effect = (base_logits - expected).abs().max().item()
    print(f"{family}: max |llama.cpp - transformers| = {error:.2e}; adapter moves logits by {adapter_effect:.2e}")
    assert error < 0.01 * adapter_effect, (error, adapter_effect)


@pytest.mark.slow
def test_smollm2_adapter_in_llama_cpp_answers_like_generate(tmp_path):
    from jalora.demo import held_out_questions, short_run
    from jalora.generate.generator import Generator, Sampling

    short_run(str(tmp_path / "run"), max_steps=10, cutoff_len=128)
    started = time.time()
    path = export(lora_weights=str(tmp_path / "run"), output_dir=str(tmp_path / "gguf"))
    export_seconds = time.time() - started

    generator = Generator.load(str(tmp_path / "run"))
    questions = held_out_questions(8)
    sampling = Sampling(max_new_tokens=PREFIX_TOKENS + 4, repetition_penalty=1.0)
    prompts = [generator.prompter.render(q, x) for q, x in questions]
    answers = generator.generate_ids(generator.prompter.encode(prompts), sampling)
    runner = llama(path)
    system = json.loads((tmp_path / "run" / "jalora.json").read_text())["system_prompt"]
    agree = 0
    for (question, _), ids in zip(questions, answers):
        reply = runner.create_chat_completion(
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            temperature=0.0,
            top_k=1,
            repeat_penalty=1.0,
            max_tokens=PREFIX_TOKENS + 4,
        )["choices"][0]["message"]["content"]
        expected = generator.prompter.decode(ids[:PREFIX_TOKENS])
        agree += reply.startswith(expected)
        print(f"{question[:20]}…  jalora: {expected!r}  llama.cpp: {reply!r}")
    print(
        f"first {PREFIX_TOKENS} tokens agree on {agree}/{len(questions)} questions; export took {export_seconds:.1f} s"
    )
    assert agree >= len(questions) - 1, agree
