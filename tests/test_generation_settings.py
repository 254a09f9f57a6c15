"""Decoding settings come from jalora's flags and the preset only: a tiny Qwen2 with the real
Qwen2.5 tokenizer and Qwen2.5-7B-Instruct's real generation_config.json (sampling on,
repetition_penalty 1.05, top_k 20, ...) decodes exactly as asked, and the model's advice is shown."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from jalora.generate.generator import Generator, Sampling
from jalora.generate.penalties import RepetitionPenalty

QWEN_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "real_tokenizers" / "qwen2.5"
IM_END, ENDOFTEXT = 151645, 151643
# Qwen2.5-7B-Instruct's generation_config.json (model card)
QWEN_INSTRUCT_GENERATION = {
    "bos_token_id": ENDOFTEXT,
    "pad_token_id": ENDOFTEXT,
    "do_sample": True,
    "eos_token_id": [IM_END, ENDOFTEXT],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}
# a harsh file: any leak of these changes a greedy answer at once
HARSH_GENERATION = {**QWEN_INSTRUCT_GENERATION, "repetition_penalty": 3.0, "no_repeat_ngram_size": 2}
PROMPT = ("日本の首都について教えてください。", "")


def tiny_real_qwen(out: Path, generation: dict) -> Path:
    """Random 2-layer Qwen2 over the real Qwen2.5 vocabulary, saved with the given generation_config."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if not QWEN_TOKENIZER.is_dir():
        pytest.skip("the real Qwen2.5 tokenizer fixture (../shared/fixtures/real_tokenizers/qwen2.5) is absent")
    shutil.copytree(QWEN_TOKENIZER, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=ENDOFTEXT,
        eos_token_id=IM_END,
        pad_token_id=ENDOFTEXT,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["real", "harsh"])
def generator(request, tmp_path_factory) -> Generator:
    generation = QWEN_INSTRUCT_GENERATION if request.param == "real" else HARSH_GENERATION
    folder = tiny_real_qwen(tmp_path_factory.mktemp("qwen") / "model", generation)
    return Generator.load(base_model=str(folder))


def plain_greedy(model, prompt: list[int], steps: int, eos_ids: list[int]) -> list[int]:
    """Argmax of the full forward at every step: greedy with no processor at all."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token in eos_ids:
                break
            ids.append(token)
    return ids[len(prompt) :]


def test_penalties_off_decode_token_for_token_like_plain_greedy(generator):
    prompt = generator.prompter.encode([generator.prompter.render(*PROMPT)])[0]
    ours = generator.generate_ids([prompt], Sampling(max_new_tokens=16, repetition_penalty=1.0))[0]
    assert len(ours) > 0
    assert ours == plain_greedy(generator.model, prompt, 16, generator.eos_ids)


def test_one_repetition_penalty_applies_and_spares_eos(generator, monkeypatch):
    """--repetition_penalty 1.2: jalora's processor is the only repetition penalty, none from the file."""
    built = []
    original = generator.model._get_logits_processor

    def spy(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(generator.model, "_get_logits_processor", spy)
    prompt = generator.prompter.encode([generator.prompter.render(*PROMPT)])[0]
    generator.generate_ids([prompt], Sampling(max_new_tokens=2, repetition_penalty=1.2))
    kinds = (RepetitionPenalty, RepetitionPenaltyLogitsProcessor)
    penalties = [p for p in built[0] if isinstance(p, kinds)]
    assert len(penalties) == 1 and isinstance(penalties[0], RepetitionPenalty)
    assert not any(type(p).__name__ in ("TopKLogitsWarper", "TemperatureLogitsWarper") for p in built[0])
    seen = torch.tensor([prompt])  # the ChatML prompt holds <|im_end|> after the system turn
    assert IM_END in prompt
    scores = torch.full((1, len(generator.tokenizer)), 2.0)
    penalised = penalties[0](seen, scores.clone())[0]
    assert penalised[IM_END] == 2.0
    assert penalised[prompt[1]] == pytest.approx(2.0 / 1.2)


def test_model_advice_is_shown_once_and_report_shows_settings_in_effect(generator):
    greedy = Sampling(repetition_penalty=1.0)
    note = generator.settings_note(greedy)
    assert note.startswith("model suggests do_sample True, temperature 0.7, top_k 20, top_p 0.8")
    assert "--temperature 0.7" in note and "to use" in note
    assert "repetition_penalty" in note  # 1.0 asked, the file says otherwise
    sampled = Sampling(
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=generator.suggested["repetition_penalty"],
        no_repeat_ngram_size=generator.suggested.get("no_repeat_ngram_size", 0),
    )
    assert generator.settings_note(sampled) is None  # the user took every suggestion
    report = generator.settings_report(greedy)
    assert report.startswith("greedy, max_new_tokens 128") and "repetition_penalty 1.0" in report
    assert f"<|im_end|> {IM_END}" in report


def test_merge_writes_the_family_end_of_turn_as_eos(tmp_path):
    """A Qwen2.5 base ships eos <|endoftext|> only; the merged ChatML model must stop at <|im_end|>."""
    from jalora.export.merge import merge

    base_file = {"bos_token_id": ENDOFTEXT, "eos_token_id": ENDOFTEXT, "do_sample": False, "max_new_tokens": 2048}
    base = tiny_real_qwen(tmp_path / "base", base_file)
    out = merge(base_model=str(base), output_dir=str(tmp_path / "merged"))
    written = json.loads((Path(out) / "generation_config.json").read_text())
    assert written["eos_token_id"][0] == IM_END and ENDOFTEXT in written["eos_token_id"]
    assert written["pad_token_id"] == ENDOFTEXT
