"""Repetition penalties as logits processors, with tokens the user exempts from them.

Why our own processors: transformers' `repetition_penalty` also punishes every prompt token,
which hurts closed QA and summarisation (the answer must reuse the context's words), and it
punishes punctuation and particles (、。のは) that every Japanese sentence repeats, which is
what garbles output when the penalty is set high. All penalties here look only at the
tokens they are documented to look at, and skip exempt tokens entirely.

For a token id t with logit l (before temperature / top-k / top-p):
- `repetition`      (transformers' rule) if t occurs anywhere in prompt + answer so far:
                    l -> l / p if l > 0 else l * p
- `generated_only`  the same rule, but only for t that occur in the answer so far
- `frequency` f and `presence` q (OpenAI's additive rule), with c_t the count of t in the
                    answer so far: l -> l - f * c_t - q * (c_t > 0)
Exempt tokens (whose text is made only of exempt characters) keep their logit under the three
answer penalties. `repetition` is transformers' rule with one exception, shared by all four: the
ids that end an answer are never penalised. A chat prompt holds the end-of-turn token after every
turn (<|im_end|>, <|eot_id|>), so transformers' rule lowers the eos logit at every step and the
model stops less often: the "never stops" trap, through a penalty.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from jalora.errors import UserError

# Punctuation, brackets and the commonest particles: every Japanese answer repeats them.
DEFAULT_EXEMPT = "、。，．・「」『』（）！？!?,.のはがをにでともへや"


@functools.lru_cache(maxsize=8)
def exempt_token_ids(tokenizer, characters: str) -> tuple[int, ...]:
    """Ids whose decoded text is non-empty and made only of `characters` (whitespace around ignored)."""
    if not characters:
        return ()
    allowed = set(characters)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    return tuple(i for i, text in enumerate(texts) if text.strip() and set(text.strip()) <= allowed)


class _AnswerPenalty(LogitsProcessor):
    """Shared part: which ids are counted (from `start` on) and which are exempt."""

    def __init__(self, start: int, exempt_ids: tuple[int, ...] = ()):
        self.start = start
        self.exempt_ids = torch.tensor(exempt_ids, dtype=torch.long)

    def counts(self, input_ids: torch.LongTensor, vocab_size: int) -> torch.Tensor:
        """Occurrences of every id in input_ids[:, start:], exempt ids zeroed; shape (batch, vocab)."""
        seen = input_ids[:, self.start :]
        counts = torch.zeros(seen.shape[0], vocab_size, dtype=torch.float32, device=seen.device)
        counts.scatter_add_(1, seen, torch.ones_like(seen, dtype=torch.float32))
        if len(self.exempt_ids):
            counts[:, self.exempt_ids.to(seen.device)] = 0
        return counts


class RepetitionPenalty(_AnswerPenalty):
    """Multiplicative penalty on ids seen since position `start` (0: prompt too, as transformers does)."""

    def __init__(self, penalty: float, start: int = 0, exempt_ids: tuple[int, ...] = ()):
        super().__init__(start, exempt_ids)
        self.penalty = penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        seen = self.counts(input_ids, scores.shape[-1]) > 0
        penalised = torch.where(scores > 0, scores / self.penalty, scores * self.penalty)
        return torch.where(seen, penalised, scores)


class FrequencyPresencePenalty(_AnswerPenalty):
    """Additive penalty: minus `frequency` per earlier occurrence, minus `presence` once if seen."""

    def __init__(self, frequency: float, presence: float, start: int, exempt_ids: tuple[int, ...] = ()):
        super().__init__(start, exempt_ids)
        self.frequency = frequency
        self.presence = presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counts = self.counts(input_ids, scores.shape[-1]).to(scores.dtype)
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


@dataclass(frozen=True)
class Penalties:
    """The user's repetition controls; 1.0 (multiplicative) and 0.0 (additive) mean off."""

    repetition: float = 1.0
    generated_only: float = 1.0
    frequency: float = 0.0
    presence: float = 0.0
    exempt: str = DEFAULT_EXEMPT

    def __post_init__(self):
        for flag, value in (("repetition_penalty", self.repetition), ("generated_only_penalty", self.generated_only)):
            if not value > 0:
                raise UserError(f"--{flag} must be > 0 (1.0 switches it off, above 1.0 discourages repeats)")

    def processors(self, tokenizer, prompt_length: int, stop_ids: tuple[int, ...] = ()) -> LogitsProcessorList:
        """Processors for one generate() call whose prompts (left-padded) are `prompt_length` long;
        `stop_ids` (the eos ids) are never penalised."""
        processors = LogitsProcessorList()
        if self.repetition == 1.0 and self.generated_only == 1.0 and not (self.frequency or self.presence):
            return processors
        exempt = (*exempt_token_ids(tokenizer, self.exempt), *stop_ids)
        if self.repetition != 1.0:
            processors.append(RepetitionPenalty(self.repetition, 0, stop_ids))
        if self.generated_only != 1.0:
            processors.append(RepetitionPenalty(self.generated_only, prompt_length, exempt))
        if self.frequency or self.presence:
            processors.append(FrequencyPresencePenalty(self.frequency, self.presence, prompt_length, exempt))
        return processors
