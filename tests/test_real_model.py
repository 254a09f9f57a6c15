"""Slow: the embedded SmolLM2-135M really learns the Japanese sample on the CPU (run with `make test-slow`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


@pytest.mark.slow
def test_real_model_learns_and_stops(tmp_path):
    from real_model import run

    figures = run(output_dir=str(tmp_path / "run"))
    assert figures["loss_reduction"] >= 0.15, figures
    assert figures["eos_share_adapter"] >= 0.9, figures
    assert figures["train_minutes"] < 15, figures
