"""Generation from a base model plus adapter, with the training run's own prompt format.

The command line of generate.py is in command.py. The run record in the adapter folder names
the base model, preset, template and system prompt, so generation renders the prompt the
way training did unless the user overrides it. Repetition controls live in penalties.py,
stop strings in stop_strings.py, streaming in streaming.py, the chat loop in chat.py and
batch files in batch_answers.py; this module wires them into one generate() call.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import StoppingCriteriaList

from jalora.data.prompts import Prompter, load_template
from jalora.errors import UserError
from jalora.generate.model_settings import eos_ids_of, neutralise, suggestion_note
from jalora.generate.penalties import DEFAULT_EXEMPT, Penalties
from jalora.generate.repetition_score import format_report, repetition_report
from jalora.generate.stop_strings import StopOnStrings, cut_at_stop, parse_stops
from jalora.generate.streaming import IncrementalText, stream_pieces
from jalora.model.loading import (
    DEFAULT_BASE_MODEL,
    compute_dtype,
    load_config,
    load_model,
    load_tokenizer,
    merge_token_rows,
    resolve_preset,
    resolve_source,
)
from jalora.model.preflight import check_adapter_fits, check_base_matches
from jalora.outputs import read_run_record
from jalora.presets import Preset


@dataclass
class Sampling:
    """Decoding settings as the user gave them; `to_kwargs` turns them into generate() kwargs."""

    max_new_tokens: int = 128
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    do_sample: bool | None = None
    num_beams: int = 1
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int = 0
    generated_only_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_exempt: str = DEFAULT_EXEMPT
    stop: str | Sequence[str] | None = ()
    prompt_lookup_num_tokens: int | None = None

    def __post_init__(self):
        self.stop = parse_stops(self.stop)

    def sampling_on(self) -> bool:
        """Sampling is on exactly when asked for, or when a temperature above 0 is set."""
        if self.do_sample is False and self.temperature:
            raise UserError("--do_sample False conflicts with --temperature > 0; drop one of them")
        return bool(self.do_sample) or bool(self.temperature and self.temperature > 0)

    def to_kwargs(self, preset: Preset) -> dict:
        sampling = self.sampling_on()
        if not sampling:
            ignored = [f"--{k}" for k in ("top_p", "top_k") if getattr(self, k) is not None]
            if ignored:
                raise UserError(
                    f"{' and '.join(ignored)} only act when sampling; add --do_sample True or --temperature 0.7 "
                    "(greedy/beam search would silently ignore them)"
                )
        defaults = preset.generation
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": sampling,
            "num_beams": self.num_beams,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        if self.prompt_lookup_num_tokens:
            kwargs["prompt_lookup_num_tokens"] = self.prompt_lookup_num_tokens
        if sampling:
            kwargs["temperature"] = self.temperature or defaults.get("temperature", 0.7)
            kwargs["top_p"] = self.top_p if self.top_p is not None else defaults.get("top_p", 1.0)
            kwargs["top_k"] = self.top_k if self.top_k is not None else defaults.get("top_k", 0)
        return kwargs

    def penalties(self, preset: Preset) -> Penalties:
        """The repetition controls; repetition_penalty defaults to the preset's recommendation."""
        return Penalties(
            repetition=self.repetition_penalty or preset.generation.get("repetition_penalty", 1.0),
            generated_only=self.generated_only_penalty,
            frequency=self.frequency_penalty,
            presence=self.presence_penalty,
            exempt=self.penalty_exempt,
        )

    def check(self, preset: Preset) -> None:
        """Fail on contradictory flags before any generation starts."""
        self.in_effect(preset)

    def in_effect(self, preset: Preset) -> dict:
        """Every decoding setting generate() runs with (flags, else the preset's defaults); nothing
        else applies (the model's generation_config is neutralised, see model_settings.py)."""
        penalties = self.penalties(preset)
        settings = self.to_kwargs(preset) | {
            "repetition_penalty": penalties.repetition,
            "generated_only_penalty": penalties.generated_only,
            "frequency_penalty": penalties.frequency,
            "presence_penalty": penalties.presence,
        }
        return settings | ({"stop": list(self.stop)} if self.stop else {})


def until_eos(ids: list[int], eos_ids: Sequence[int]) -> list[int]:
    return ids[: next((i for i, t in enumerate(ids) if t in eos_ids), len(ids))]


class Generator:
    """A loaded model (with adapter, if any), its tokenizer, the prompter used in training and
    optionally a small draft model for assisted decoding."""

    def __init__(self, model, tokenizer, prompter: Prompter, assistant=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompter = prompter
        self.assistant = assistant
        eos = eos_ids_of(model.generation_config)
        self.eos_ids = sorted({tokenizer.eos_token_id, *eos})
        self.suggested = neutralise(model, self.eos_ids, tokenizer.pad_token_id)
        if assistant is not None:
            neutralise(assistant, self.eos_ids, tokenizer.pad_token_id)

    def settings_note(self, sampling: Sampling) -> str | None:
        """The model's own suggestions that differ from the settings in effect, as one line."""
        return suggestion_note(self.suggested, sampling.in_effect(self.prompter.preset))

    def settings_report(self, sampling: Sampling) -> str:
        """The decoding settings in effect, for --report."""
        settings = sampling.in_effect(self.prompter.preset)
        mode = "sampling" if settings.pop("do_sample") else "beam search" if settings["num_beams"] > 1 else "greedy"
        stops = ", ".join(f"{self.tokenizer.convert_ids_to_tokens(i)} {i}" for i in self.eos_ids)
        return f"{mode}, " + ", ".join(f"{k} {v}" for k, v in settings.items()) + f"; eos (never penalised): {stops}"

    @classmethod
    def load(
        cls,
        lora_weights: str | None = None,
        base_model: str | None = None,
        preset: str | None = None,
        prompt_template_name: str | None = None,
        system_prompt: str | None = None,
        quantization: str | None = None,
        trust_remote_code: bool = False,
        assistant_model: str | None = None,
        device_map: str | None = None,
    ) -> Generator:
        """Base model, its quantization and prompt format from the adapter's run record; arguments override it.
        `device_map="auto"` spreads a model too large for one GPU over all GPUs (and CPU RAM)."""
        from peft import PeftModel

        record = read_run_record(lora_weights) if lora_weights else {}
        base_model = base_model or record.get("base_model") or DEFAULT_BASE_MODEL
        the_preset = resolve_preset(preset or record.get("preset"), base_model, trust_remote_code)
        template = load_template(prompt_template_name or record.get("template") or the_preset.template)
        source = resolve_source(base_model)
        if lora_weights and "base_config" in record and base_model != record.get("base_model"):
            check_base_matches(lora_weights, record, load_config(source, trust_remote_code))
        tokenizer = load_tokenizer(source, the_preset, trust_remote_code)
        if system_prompt is None:
            system_prompt = record.get("system_prompt")
        prompter = Prompter(template, tokenizer, the_preset, system_prompt)
        quantization, why = (quantization, "--quantization") if quantization else run_quantization(record)
        print(f"base model {base_model} loaded with quantization {quantization} ({why})", file=sys.stderr)
        model = load_model(source, quantization, compute_dtype(), trust_remote_code, device_map)
        model.config.pad_token_id = tokenizer.pad_token_id
        if lora_weights:
            check_adapter_fits(lora_weights, model)
            model = PeftModel.from_pretrained(model, lora_weights)
            merge_token_rows(model)
        assistant = load_assistant(assistant_model, tokenizer, trust_remote_code) if assistant_model else None
        return cls(model, tokenizer, prompter, assistant)

    # --- ids ------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], sampling: Sampling, streamer=None) -> list[list[int]]:
        """Generated ids per prompt (left-padded batch), cut at the prompt length and the first eos.

        Assisted decoding (prompt lookup, draft model) works one sequence at a time in
        transformers, so such batches are split into single prompts here.
        """
        if len(prompts) > 1 and (self.assistant is not None or sampling.prompt_lookup_num_tokens):
            return [self.generate_ids([p], sampling)[0] for p in prompts]
        preset = self.prompter.preset
        longest = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=self.model.device)
        attention = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
        extra = {"assistant_model": self.assistant} if self.assistant is not None else {}
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            eos_token_id=self.eos_ids,
            pad_token_id=pad,
            logits_processor=sampling.penalties(preset).processors(self.tokenizer, longest, tuple(self.eos_ids)),
            stopping_criteria=StoppingCriteriaList(
                [StopOnStrings(sampling.stop, longest, self.text_of)] if sampling.stop else []
            ),
            streamer=streamer,
            **extra,
            **sampling.to_kwargs(preset),
        )
        return [until_eos(row, self.eos_ids) for row in out[:, longest:].tolist()]

    def text_of(self, ids: list[int]) -> str:
        """Answer text of generated ids (up to the first eos), without a last character that
        max_new_tokens cut in half (it would show as U+FFFD)."""
        return self.prompter.decode(until_eos(ids, self.eos_ids)).rstrip("\ufffd")

    # --- text -----------------------------------------------------------------------------
    def complete(self, prompt_texts: list[str], sampling: Sampling) -> list[str]:
        """Answers for rendered prompts, each cut before its first stop string."""
        ids = self.generate_ids(self.prompter.encode(prompt_texts), sampling)
        return [cut_at_stop(self.text_of(row), sampling.stop) for row in ids]

    def answer(self, instructions: list[tuple[str, str]], sampling: Sampling) -> list[str]:
        """Answers for (instruction, input) pairs."""
        return self.complete([self.prompter.render(i, x) for i, x in instructions], sampling)

    def stream(self, prompt_text: str, sampling: Sampling) -> Iterator[str]:
        """The answer to one rendered prompt, in printable pieces that join to `complete`'s text."""
        if sampling.num_beams > 1:
            raise UserError("--stream shows one sequence as it grows; it cannot be combined with --num_beams > 1")
        ids = self.prompter.encode([prompt_text])
        text = IncrementalText(self.text_of, sampling.stop)
        yield from stream_pieces(lambda streamer: self.generate_ids(ids, sampling, streamer), text)

    @contextmanager
    def adapter_disabled(self):
        """The base model's own answers (for --compare_base): the LoRA layers switched off for a while.
        peft puts back the original token rows on the way in; they are written in again on the way out,
        or every later adapter pass would copy the whole embedding (see `merge_token_rows`)."""
        if not hasattr(self.model, "disable_adapter"):
            raise UserError("--compare_base needs --lora_weights (an adapter to compare the base model with)")
        try:
            with self.model.disable_adapter():
                yield
        finally:
            merge_token_rows(self.model)


def run_quantization(record: dict) -> tuple[str, str]:
    """How training loaded the base (an adapter is best used on the base it was trained against)."""
    if "quantization" in record:
        return record["quantization"], "as in training; --quantization overrides"
    return "none", "the default; --quantization overrides"


def load_assistant(name: str, tokenizer, trust_remote_code: bool = False):
    """A draft model for assisted decoding; it must share the main model's tokenizer."""
    from transformers import AutoTokenizer

    source = resolve_source(name)
    draft_tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs())
    if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"--assistant_model {name}: its tokenizer differs from the main model's; a draft model must share "
            "the vocabulary (e.g. a smaller model of the same family)"
        )
    return load_model(source, "none", compute_dtype(), trust_remote_code).eval()


def show_answer(generator: Generator, prompt_text: str, sampling: Sampling, stream: bool, report: bool) -> str:
    """Print the answer to one prompt (as it grows, with --stream) and, with --report, its scores."""
    if stream:
        pieces = []
        for piece in generator.stream(prompt_text, sampling):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print()
        text = "".join(pieces)
    else:
        text = generator.complete([prompt_text], sampling)[0]
        print(text)
    if report:
        print(f"[report] {format_report(repetition_report(text))}", file=sys.stderr, flush=True)
    return text
