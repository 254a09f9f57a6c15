"""Slow: `jalora ui`, started as users start it, under 8 concurrent requests from gradio's own client.

Every request gets the answer generate.py gives for its prompt (greedy), none errors, and bad
requests (empty, 100,000 characters, max_new_tokens 10^9) get a message while the server goes
on serving. Prints the first and last answer's latency. Needs the [ui] extra (gradio,
gradio_client); skipped without it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_export import random_adapter
from test_ui_browser import free_port, wait_until_served

from jalora.generate.penalties import DEFAULT_EXEMPT
from jalora.presets import get_preset

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "日本で一番高い山は何ですか？",
    "京都の有名なお寺を一つ挙げてください。",
    "寿司について一言で説明してください。",
    "桜はいつ咲きますか？",
    "新幹線の良いところは？",
    "俳句とは何ですか？",
    "温泉の楽しみ方を教えてください。",
    "味噌汁の材料は？",
]
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """A tiny adapter, the answers generate.py gives for PROMPTS, and `jalora ui` serving it."""
    pytest.importorskip("gradio", reason="the web demo needs the [ui] extra")
    pytest.importorskip("gradio_client", reason="the load test drives the demo with gradio_client")
    root = tmp_path_factory.mktemp("ui_load")
    adapter = root / "run"
    random_adapter(str(tiny_model_dir("llama3-elyza")), "llama3-elyza", "none", adapter)
    requests, answers = root / "prompts.jsonl", root / "answers.jsonl"
    requests.write_text("".join(json.dumps({"instruction": p}, ensure_ascii=False) + "\n" for p in PROMPTS), "utf-8")
    subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--lora_weights", str(adapter), "--data_path", str(requests)]
        + ["--output_file", str(answers), "--batch_size", "1", "--max_new_tokens", str(MAX_NEW_TOKENS)],
        capture_output=True,
        text=True,
        check=True,
    )
    expected = {r["instruction"]: r["response"] for r in map(json.loads, answers.read_text("utf-8").splitlines())}
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "from jalora.cli import main; main()", "ui", "--lora_weights", str(adapter)]
        + ["--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_served(url, server, seconds=600)  # a loaded CI box imports gradio and torch slowly
        yield url, expected, server
    finally:
        server.terminate()
        server.wait(timeout=60)


def ask(client, instruction: str, max_new_tokens: float = MAX_NEW_TOKENS) -> tuple[str, str]:
    """Every control of the page in order (the API names varargs by position): greedy, the page's defaults."""
    defaults = get_preset("llama3-elyza").generation
    controls = [
        instruction, "", max_new_tokens, 0.0, defaults.get("top_p", 1.0), defaults.get("top_k", 0),
        defaults.get("repetition_penalty", 1.0), 1.0, 0.0, 0.0, 0, DEFAULT_EXEMPT, "",
    ]  # fmt: skip
    return client.predict(*controls, api_name="/run")


def test_eight_concurrent_users_each_get_their_own_answer(served):
    from gradio_client import Client

    url, expected, server = served
    client = Client(url, verbose=False)
    started = time.perf_counter()

    def one(prompt: str) -> tuple[str, str, float]:
        answer, report = ask(client, prompt)
        return prompt, answer, time.perf_counter() - started

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(one, PROMPTS))
    latencies = sorted(seconds for _, _, seconds in results)
    print(f"\n8 concurrent requests: first answer after {latencies[0]:.2f} s, last after {latencies[-1]:.2f} s")
    for prompt, answer, _ in results:
        assert answer == expected[prompt], prompt
    assert len(set(expected.values())) > 1, "the prompts must have different answers to catch mixed-up streams"
    assert server.poll() is None


@pytest.mark.parametrize(
    "instruction, max_new_tokens, message",
    [
        ("", MAX_NEW_TOKENS, "the instruction is empty"),
        (("富士山は高い。" * 15_000)[:100_000], MAX_NEW_TOKENS, "shorten the instruction or input"),
        ("富士山について", 10**9, "greater than maximum value 1024"),  # gradio's slider checks it first
    ],
    ids=["empty", "100k characters", "max_new_tokens 1e9"],
)
def test_bad_request_gets_a_message_and_the_server_keeps_serving(served, instruction, max_new_tokens, message):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, expected, server = served
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match=message):
        ask(client, instruction, max_new_tokens)
    prompt = PROMPTS[0]
    assert ask(client, prompt)[0] == expected[prompt]
    assert server.poll() is None
