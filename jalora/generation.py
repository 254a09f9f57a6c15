"""Generation from a base model plus adapter, with the training run's own prompt format.

`main()` is the command line of generate.py. The run record in the adapter folder names
the base model, preset, template and system prompt, so generation renders the prompt the
way training did unless the user overrides it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from jalora.errors import UserError, friendly_errors
from jalora.modeling import (
    DEFAULT_BASE_MODEL,
    compute_dtype,
    load_config,
    load_model,
    load_tokenizer,
    resolve_source,
)
from jalora.outputs import read_run_record, write_atomic
from jalora.preflight import check_adapter_fits, check_base_matches
from jalora.presets import Preset, get_preset
from jalora.prompts import Prompter, load_template


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
            "repetition_penalty": self.repetition_penalty or defaults.get("repetition_penalty", 1.0),
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        if sampling:
            kwargs["temperature"] = self.temperature or defaults.get("temperature", 0.7)
            kwargs["top_p"] = self.top_p if self.top_p is not None else defaults.get("top_p", 1.0)
            kwargs["top_k"] = self.top_k if self.top_k is not None else defaults.get("top_k", 0)
        return kwargs


class Generator:
    """A loaded model (with adapter, if any), its tokenizer and the prompter used in training."""

    def __init__(self, model, tokenizer, prompter: Prompter):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompter = prompter
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos_ids = sorted({tokenizer.eos_token_id, *eos})

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
    ) -> Generator:
        """Base model and prompt format from the adapter's run record; arguments override it."""
        from peft import PeftModel

        from jalora.train import resolve_preset

        record = read_run_record(lora_weights) if lora_weights else {}
        base_model = base_model or record.get("base_model") or DEFAULT_BASE_MODEL
        the_preset = get_preset(preset or record["preset"]) if (preset or "preset" in record) else None
        the_preset = the_preset or resolve_preset(None, base_model, trust_remote_code)
        template = load_template(prompt_template_name or record.get("template") or the_preset.template)
        source = resolve_source(base_model)
        if lora_weights and "base_config" in record and base_model != record.get("base_model"):
            check_base_matches(lora_weights, record, load_config(source, trust_remote_code))
        tokenizer = load_tokenizer(source, the_preset, trust_remote_code)
        if system_prompt is None:
            system_prompt = record.get("system_prompt")
        prompter = Prompter(template, tokenizer, the_preset, system_prompt)
        model = load_model(source, quantization or "none", compute_dtype(), trust_remote_code)
        model.config.pad_token_id = tokenizer.pad_token_id
        if lora_weights:
            check_adapter_fits(lora_weights, model)
            model = PeftModel.from_pretrained(model, lora_weights)
        return cls(model, tokenizer, prompter)

    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
        """Generated ids per prompt (left-padded batch), cut at the prompt length and the first eos."""
        longest = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=self.model.device)
        attention = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            eos_token_id=self.eos_ids,
            pad_token_id=pad,
            **sampling.to_kwargs(self.prompter.preset),
        )
        answers = []
        for row in out[:, longest:].tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos_ids), len(row))
            answers.append(row[:end])
        return answers

    def answer(self, instructions: list[tuple[str, str]], sampling: Sampling) -> list[str]:
        """Answers for (instruction, input) pairs."""
        prompts = self.prompter.encode([self.prompter.render(i, x) for i, x in instructions])
        return [self.prompter.decode(ids) for ids in self.generate_ids(prompts, sampling)]


def _answer_file(generator: Generator, input_file: str, output_file: str, sampling: Sampling, batch_size: int) -> None:
    """Add a `response` field to every record of a JSONL/JSON file, keeping its other fields."""
    from jalora.data import iter_rows

    path = Path(input_file)
    if not path.is_file():
        raise UserError(f"{input_file}: input file not found")
    rows = []
    for where, row in iter_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise UserError(f"{where}: field 'instruction' is missing or not a string")
        rows.append(row)
    lines = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        answers = generator.answer([(r["instruction"], str(r.get("input") or "")) for r in chunk], sampling)
        lines += [json.dumps({**row, "response": a}, ensure_ascii=False) for row, a in zip(chunk, answers)]
    write_atomic(Path(output_file), ("\n".join(lines) + "\n").encode("utf-8"))
    print(f"wrote {len(lines)} answers to {output_file}")


@friendly_errors
def main(
    prompt: str | None = None,
    input: str = "",
    lora_weights: str | None = None,
    base_model: str | None = None,
    input_file: str | None = None,
    output_file: str | None = None,
    batch_size: int = 8,
    preset: str | None = None,
    prompt_template_name: str | None = None,
    system_prompt: str | None = None,
    quantization: str | None = None,
    max_new_tokens: int = 128,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    do_sample: bool | None = None,
    num_beams: int = 1,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int = 0,
    trust_remote_code: bool = False,
) -> None:
    """Answer one instruction (--prompt, optional --input) or every record of --input_file.

    Decoding is greedy unless --do_sample True or --temperature > 0; --top_p/--top_k
    without sampling are an error rather than silently ignored. repetition_penalty defaults
    to the preset's recommendation.
    """
    if (prompt is None) == (input_file is None):
        raise UserError("give either --prompt or --input_file (with --output_file)")
    if input_file and not output_file:
        raise UserError("--input_file needs --output_file")
    sampling = Sampling(
        max_new_tokens, temperature, top_p, top_k, do_sample, num_beams, repetition_penalty, no_repeat_ngram_size
    )
    generator = Generator.load(
        lora_weights, base_model, preset, prompt_template_name, system_prompt, quantization, trust_remote_code
    )
    sampling.to_kwargs(generator.prompter.preset)  # fail on bad flags before generating anything
    if input_file:
        _answer_file(generator, input_file, output_file, sampling, batch_size)
    else:
        print(generator.answer([(str(prompt), str(input))], sampling)[0])
