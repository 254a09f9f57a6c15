"""`jalora ui`: a small web demo with the same controls as generate.py (needs `pip install -e .[ui]`).

gradio is imported only when the demo starts, so the package and its tests never need it;
`answer_stream` holds the logic and is plain Python.

Many users at once: gradio's queue runs one generation at a time (concurrency limit 1: one
model, one device; two generations in threads would share it, not finish sooner) and holds up
to --max_queue waiting requests, each with its own stream; the rest are refused with "queue is
full". A request the model cannot serve (empty, longer than the model's context, too many new
tokens) gets a message in the page and the server goes on serving.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from jalora.errors import UserError, friendly_errors
from jalora.generate.generator import Generator, Sampling
from jalora.generate.penalties import DEFAULT_EXEMPT
from jalora.generate.repetition_score import format_report, repetition_report
from jalora.quiet import quiet_third_party

MAX_NEW_TOKENS = 1024  # the slider's end; the API must not ask for more than the page can
CONCURRENCY_LIMIT = 1  # generations at once; the rest wait in the queue


def check_request(generator: Generator, prompt_text: str, max_new_tokens: int) -> None:
    """Refuse what the model cannot serve before it starts, with a message for the page."""
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS} (got {max_new_tokens})")
    context = getattr(generator.model.config, "max_position_embeddings", None)
    if context:
        length = len(generator.prompter.encode([prompt_text])[0])
        if length + max_new_tokens > context:
            raise UserError(
                f"the prompt is {length} tokens; with max_new_tokens {max_new_tokens} that is more than "
                f"the {context} tokens this model can read: shorten the instruction or input"
            )


def answer_stream(
    generator: Generator,
    instruction: str,
    input: str = "",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    generated_only_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    no_repeat_ngram_size: int = 0,
    penalty_exempt: str = DEFAULT_EXEMPT,
    stop: str = "",
) -> Iterator[tuple[str, str]]:
    """(answer so far, repetition report) pairs; the report comes with the last one.

    Temperature 0 means greedy, and then top_p/top_k are not passed (they would not act).
    `stop` holds one stop string per line.
    """
    sampled = temperature > 0
    sampling = Sampling(
        max_new_tokens=int(max_new_tokens),
        temperature=temperature if sampled else None,
        top_p=top_p if sampled else None,
        top_k=int(top_k) if sampled else None,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=int(no_repeat_ngram_size),
        generated_only_penalty=generated_only_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        penalty_exempt=penalty_exempt,
        stop=tuple(line for line in stop.splitlines() if line),
    )
    sampling.check(generator.prompter.preset)
    if not instruction.strip():
        raise UserError("the instruction is empty: type a question or a task")
    prompt_text = generator.prompter.render(instruction, input)
    check_request(generator, prompt_text, sampling.max_new_tokens)
    text = ""
    for piece in generator.stream(prompt_text, sampling):
        text += piece
        yield text, ""
    yield text, format_report(repetition_report(text))


def build_demo(gr, generator: Generator):
    """The gradio Blocks app: inputs on the left, streamed answer and its report on the right."""
    defaults = generator.prompter.preset.generation

    def run(*values):
        try:
            yield from answer_stream(generator, *values)
        except UserError as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title="jalora") as demo:
        gr.Markdown(f"### jalora: {generator.prompter.preset.name} / template {generator.prompter.template.name}")
        with gr.Row():
            with gr.Column():
                controls = [
                    gr.Textbox(label="instruction (指示)", lines=4, elem_id="instruction"),
                    gr.Textbox(label="input (入力, optional)", lines=3),
                    gr.Slider(1, MAX_NEW_TOKENS, value=128, step=1, label="max_new_tokens"),
                    gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)"),
                    gr.Slider(0.0, 1.0, value=defaults.get("top_p", 1.0), step=0.01, label="top_p (sampling only)"),
                    gr.Slider(0, 200, value=defaults.get("top_k", 0), step=1, label="top_k (sampling only, 0 = off)"),
                    gr.Slider(
                        1.0,
                        2.0,
                        value=defaults.get("repetition_penalty", 1.0),
                        step=0.01,
                        label="repetition_penalty (prompt + answer)",
                    ),  # fmt: skip
                    gr.Slider(1.0, 2.0, value=1.0, step=0.01, label="generated_only_penalty (answer only)"),
                    gr.Slider(-2.0, 2.0, value=0.0, step=0.05, label="frequency_penalty"),
                    gr.Slider(-2.0, 2.0, value=0.0, step=0.05, label="presence_penalty"),
                    gr.Slider(0, 10, value=0, step=1, label="no_repeat_ngram_size (0 = off)"),
                    gr.Textbox(label="penalty_exempt (characters)", value=DEFAULT_EXEMPT),
                    gr.Textbox(label="stop strings (one per line)", lines=2),
                ]
                button = gr.Button("generate", variant="primary", elem_id="generate")
            with gr.Column():
                answer = gr.Textbox(label="answer", lines=16, elem_id="answer")
                report = gr.Textbox(label="repetition report", elem_id="report")
        button.click(run, inputs=controls, outputs=[answer, report], concurrency_limit=CONCURRENCY_LIMIT)
    return demo


@friendly_errors
def ui(
    lora_weights: str | None = None,
    base_model: str | None = None,
    preset: str | None = None,
    prompt_template_name: str | None = None,
    system_prompt: str | None = None,
    quantization: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    max_queue: int = 64,
    trust_remote_code: bool = False,
    verbose: bool = False,
) -> None:
    """Serve the web demo for an adapter (or a base model) at http://HOST:PORT (--verbose: the
    libraries' warnings and log lines too). One answer is generated at a time; up to --max_queue
    requests wait their turn, more are refused (docs/generation.md)."""
    quiet_third_party(verbose)
    try:
        import gradio as gr
    except ImportError:
        raise UserError("the web demo needs gradio: pip install -e '.[ui]'") from None
    generator = Generator.load(
        lora_weights, base_model, preset, prompt_template_name, system_prompt, quantization, trust_remote_code
    )
    note = generator.settings_note(Sampling(max_new_tokens=128))  # the demo opens greedy, as generate.py does
    if note:
        print(note, file=sys.stderr)
    if max_queue < 1:
        raise UserError("--max_queue must be at least 1")
    demo = build_demo(gr, generator).queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=max_queue)
    demo.launch(server_name=host, server_port=port, share=share)
