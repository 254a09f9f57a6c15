"""The generate command (generate.py, `jalora generate`): one prompt, a batch file or a chat."""

from __future__ import annotations

import sys

from jalora.errors import UserError, friendly_errors
from jalora.flags import checked_settings
from jalora.generate.batch_answers import answer_file
from jalora.generate.chat import chat_loop
from jalora.generate.generator import Generator, Sampling, show_answer
from jalora.generate.penalties import DEFAULT_EXEMPT
from jalora.quiet import quiet_third_party
from jalora.run_lock import locks_output


def _compare(generator: Generator, prompt_text: str, sampling: Sampling, stream: bool, report: bool) -> None:
    """Base model and adapter answers to the same prompt, one after the other, labelled."""
    with generator.adapter_disabled():
        print("=== base model ===")
        show_answer(generator, prompt_text, sampling, stream, report)
    print("=== with adapter ===")
    show_answer(generator, prompt_text, sampling, stream, report)


@friendly_errors
@locks_output("output_file")
def main(
    prompt: str | None = None,
    input: str = "",
    lora_weights: str | None = None,
    base_model: str | None = None,
    data_path: str | None = None,
    output_file: str | None = None,
    batch_size: int = 8,
    interactive: bool = False,
    stream: bool = False,
    report: bool = False,
    compare_base: bool = False,
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
    generated_only_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    penalty_exempt: str = DEFAULT_EXEMPT,
    no_repeat_ngram_size: int = 0,
    stop: str | list[str] | None = None,
    prompt_lookup_num_tokens: int | None = None,
    assistant_model: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    verbose: bool = False,
) -> None:
    """Answer one instruction (--prompt, optional --input), every record of --data_path, or chat (--interactive).

    Decoding is greedy unless --do_sample True or --temperature > 0; --top_p/--top_k
    without sampling are an error rather than silently ignored. repetition_penalty defaults
    to the preset's recommendation. See docs/generation.md for every flag.
    """
    quiet_third_party(verbose)
    checked_settings(main, locals())  # for Python callers: the checks the command line already made
    if sum((prompt is not None, data_path is not None, bool(interactive))) != 1:
        raise UserError("give one of --prompt, --data_path (with --output_file) or --interactive")
    if data_path and not output_file:
        raise UserError("--data_path needs --output_file")
    sampling = Sampling(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        do_sample=do_sample,
        num_beams=num_beams,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        generated_only_penalty=generated_only_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        penalty_exempt=str(penalty_exempt or ""),
        stop=stop,
        prompt_lookup_num_tokens=prompt_lookup_num_tokens,
    )
    if interactive and compare_base:
        raise UserError("--compare_base works with --prompt or --data_path, not --interactive")
    if data_path and stream:
        raise UserError("--stream prints one answer as it grows; batch files show a progress bar instead")
    if compare_base and not lora_weights:
        raise UserError("--compare_base needs --lora_weights (an adapter to compare the base model with)")
    generator = Generator.load(
        lora_weights,
        base_model,
        preset,
        prompt_template_name,
        system_prompt,
        quantization,
        trust_remote_code,
        assistant_model,
        device_map,
    )
    sampling.check(generator.prompter.preset)  # fail on bad flags before generating anything
    note = generator.settings_note(sampling)
    if note:
        print(note, file=sys.stderr)
    if report:
        print(f"[report] decoding: {generator.settings_report(sampling)}", file=sys.stderr, flush=True)
    if interactive:
        chat_loop(generator, sampling, stream=num_beams == 1, report=report)
    elif data_path:
        answer_file(generator, data_path, output_file, sampling, batch_size, report=report, compare=compare_base)
    else:
        prompt_text = generator.prompter.render(str(prompt), str(input))
        if compare_base:
            _compare(generator, prompt_text, sampling, stream, report)
        else:
            show_answer(generator, prompt_text, sampling, stream, report)
