"""Repetition penalties, exemptions, stop strings, streaming text and repetition scores, without a model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, RepetitionPenaltyLogitsProcessor

from jalora.errors import UserError
from jalora.generate.penalties import FrequencyPresencePenalty, Penalties, RepetitionPenalty, exempt_token_ids
from jalora.generate.repetition_score import distinct_n, repeated_ngram_share, repetition_report
from jalora.generate.stop_strings import cut_at_stop, parse_stops, partial_stop_length
from jalora.generate.streaming import IncrementalText

RARE_KANJI_TEXT = "鬱蒼とした森で齟齬が生じた。東京の天気は晴れ。"


def random_case(seed: int = 0, batch: int = 3, length: int = 12, vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    scores = torch.randn(batch, vocab, generator=g) * 3
    return ids, scores


def test_repetition_penalty_over_the_whole_context_is_transformers_rule():
    ids, scores = random_case()
    ours = RepetitionPenalty(1.7, start=0)(ids, scores.clone())
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(ids, scores.clone())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_generated_only_penalty_ignores_prompt_tokens():
    ids, scores = random_case(seed=1)
    ours = RepetitionPenalty(1.5, start=7)(ids, scores.clone())
    theirs = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=7)(ids, scores.clone())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # by hand: token 0 only in the prompt keeps its logit; token 1 (answer) 2.0 -> 1.0, token 2 -1.0 -> -2.0
    ids = torch.tensor([[0, 0, 1, 2, 2]])
    scores = torch.tensor([[4.0, 2.0, -1.0, 0.5]])
    assert RepetitionPenalty(2.0, start=2)(ids, scores).tolist() == [[4.0, 1.0, -2.0, 0.5]]


def test_frequency_and_presence_penalties_are_openai_additive_rule():
    ids = torch.tensor([[3, 3, 2, 2, 2, 1]])  # prompt [3, 3]; answer: token 2 three times, token 1 once
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    out = FrequencyPresencePenalty(frequency=0.5, presence=0.25, start=2)(ids, scores)
    assert out.tolist() == [[1.0, 1.0 - 0.5 - 0.25, 1.0 - 1.5 - 0.25, 1.0]]

    ids, scores = random_case(seed=2)
    out = FrequencyPresencePenalty(0.3, 0.7, start=4)(ids, scores.clone())
    for row in range(ids.shape[0]):
        answer = ids[row, 4:].tolist()
        for t in range(scores.shape[1]):
            c = answer.count(t)
            assert out[row, t].item() == pytest.approx(scores[row, t].item() - 0.3 * c - 0.7 * (c > 0), abs=1e-6)


def test_exempt_tokens_keep_their_logits_under_every_penalty():
    ids = torch.tensor([[1, 1, 2, 2, 3]])
    scores = torch.tensor([[0.0, 2.0, 2.0, -2.0]])
    exempt = (2,)
    assert RepetitionPenalty(2.0, 0, exempt)(ids, scores).tolist() == [[0.0, 1.0, 2.0, -4.0]]
    assert FrequencyPresencePenalty(1.0, 1.0, 0, exempt)(ids, scores).tolist() == [[0.0, -1.0, 2.0, -4.0]]


def test_eos_in_a_chat_prompt_is_never_penalised(tiny_model_dir):
    """<|im_end|> closes every turn of the prompt: penalising it would keep the model from stopping."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir("qwen2.5")))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, scores = random_case(seed=3, vocab=len(tokenizer))
    ids[:, 2] = eos  # in the prompt
    ids[:, -1] = eos  # and in the answer
    scores[:, eos] = 5.0
    processors = Penalties(1.3, 1.3, 0.5, 0.5).processors(tokenizer, 6, stop_ids=(eos,))
    out = scores.clone()
    for processor in processors:
        out = processor(ids, out)
    assert out[:, eos].tolist() == [5.0] * ids.shape[0]
    # every other id: the repetition part is still exactly transformers' rule
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone())
    ours = processors[0](ids, scores.clone())
    others = torch.arange(scores.shape[1]) != eos
    torch.testing.assert_close(ours[:, others], theirs[:, others], rtol=0, atol=0)
    assert theirs[0, eos] < 5.0  # which would have lowered it


def test_default_exemptions_cover_japanese_punctuation_and_particles(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir("open-calm")))
    exempt = set(exempt_token_ids(tokenizer, Penalties().exempt))
    ids = tokenizer("東京の天気は晴れ、富士山が見える。", add_special_tokens=False)["input_ids"]
    by_text = {tokenizer.decode([i]): i for i in ids}
    for text in ("、", "。", "は", "が"):
        assert by_text[text] in exempt, text
    assert by_text["東京"] not in exempt
    assert exempt_token_ids(tokenizer, "") == ()


def test_penalties_off_add_no_processor_and_bad_values_are_user_errors(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir("open-calm")))
    assert len(Penalties().processors(tokenizer, 5)) == 0
    kinds = [type(p) for p in Penalties(1.2, 1.3, 0.1, 0.0).processors(tokenizer, 5)]
    assert kinds == [RepetitionPenalty, RepetitionPenalty, FrequencyPresencePenalty]
    with pytest.raises(UserError, match="--generated_only_penalty must be > 0"):
        Penalties(generated_only=0.0)


def test_repetition_scores_by_hand():
    assert repeated_ngram_share("ああああ") == pytest.approx(0.5)  # あああ twice
    assert distinct_n("ああああ") == pytest.approx(1 / 3)  # ああ three times
    assert repeated_ngram_share("abcabc") == pytest.approx(0.25)  # abc bca cab abc
    assert distinct_n("abcabc") == pytest.approx(3 / 5)  # ab bc ca ab bc
    assert repetition_report("東京") == {"repeated_3gram_share": 0.0, "distinct_2": 1.0, "top_3gram_count": 0}


def test_stop_string_helpers():
    assert parse_stops("### 指示") == ("### 指示",)
    assert parse_stops(["a", "b"]) == ("a", "b") and parse_stops(None) == ()
    assert parse_stops("\\n") == ("\n",)  # what a shell passes for --stop "\n"
    assert cut_at_stop("答え。\n### 指示: 次", ("### 指示", "次")) == "答え。\n"
    assert partial_stop_length("答え。##", ("### 指示",)) == 2
    assert partial_stop_length("答え。", ("### 指示",)) == 0


@pytest.mark.parametrize("family", ["open-calm", "qwen2.5", "elyza-llama2"])
def test_streamed_pieces_never_split_a_character_and_join_to_the_text(tiny_model_dir, family):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir(family)))
    ids = tokenizer(RARE_KANJI_TEXT, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "the test text must split a character"

    def decode(part):
        return tokenizer.decode(part, skip_special_tokens=True)

    text = IncrementalText(decode)
    pieces = [text.push([i]) for i in ids] + [text.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == decode(ids) == RARE_KANJI_TEXT


def test_streaming_holds_back_the_start_of_a_stop_string(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir("open-calm")))
    ids = tokenizer("晴れです。\n### 指示: 次の質問", add_special_tokens=False)["input_ids"]
    text = IncrementalText(lambda part: tokenizer.decode(part), ("### 指示",))
    pieces = [text.push([i]) for i in ids] + [text.finish()]
    assert "".join(pieces) == "晴れです。\n"
    assert not any("#" in p for p in pieces)
