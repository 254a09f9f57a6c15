"""Slow: `jalora ui` opened in a real headless Chromium (Debian's package, driven by selenium): a
Japanese prompt typed in, the button pressed, the streamed answer read back equal to generate.py's.

Needs `pip install -e '.[ui,browser]'` (make test-slow does it) and Debian's `chromium chromium-driver`
(`make browser`); skipped without them."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from jalora.train.finetune import finetune

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "日本で一番高い山は何ですか？"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_served(url: str, server: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"jalora ui exited with {server.returncode}:\n{server.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"jalora ui did not answer at {url} within {seconds} s")


@pytest.fixture
def browser(tmp_path):
    """Headless Debian Chromium through its own chromedriver (selenium downloads nothing)."""
    pytest.importorskip("gradio", reason="the web demo needs the [ui] extra")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (make test-slow installs it)")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("needs Debian's chromium and chromium-driver packages (make browser)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


@pytest.fixture
def adapter(tiny_model_dir, tmp_path) -> Path:
    topics = ("富士山", "京都")
    rows = [{"instruction": f"{t}について教えてください。", "output": f"{t}は日本にあります。"} for t in topics]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "adapter"
    finetune(
        base_model=str(tiny_model_dir("llama3-elyza")),
        data_path=str(data),
        output_dir=str(out),
        batch_size=2,
        micro_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        val_set_size=0,
        eval_before_training=False,
    )
    return out


def test_web_demo_streams_the_answer_generate_gives(browser, adapter, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--lora_weights", str(adapter), "--prompt", PROMPT],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.removesuffix("\n")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "from jalora.cli import main; main()", "ui", "--lora_weights", str(adapter)]
        + ["--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_served(url, server)
        browser.get(url)
        wait = WebDriverWait(browser, 120)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#instruction textarea"))
        box.send_keys(PROMPT)
        assert box.get_attribute("value") == PROMPT
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        # the repetition report arrives with the last piece of the stream
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#report textarea").get_attribute("value"))
        answer = browser.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")
        screenshot = tmp_path / "jalora-ui.png"
        assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert answer and answer == expected
