"""Shared pytest fixtures: tiny offline stand-ins of the supported Japanese model families."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # lets test modules do `from tiny_models import ...`
    sys.path.insert(0, str(TESTS_DIR))

from tiny_models import FAMILIES, build_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: ``tiny_model_dir("open-calm")`` -> directory ``.../open-calm/``, built once per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        if family not in built:
            built[family] = build_tiny(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="session", autouse=True)
def tokenization_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the tokenization cache of every test run (subprocesses included) out of ~/.cache."""
    import os

    folder = tmp_path_factory.mktemp("tokenized")
    os.environ["JALORA_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def demo_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`make demo`'s adapter on the real gemma-3-270m (its recipe and step count) and its run record,
    trained once per session for the slow tests that check it (tests/test_real_model.py, llama.cpp)."""
    from jalora.demo import DEMO_STEPS, short_run

    out = tmp_path_factory.mktemp("demo") / "run"
    return out, short_run(str(out), DEMO_STEPS)
