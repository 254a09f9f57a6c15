"""The tokenization cache: a second run with the same records and settings reads the same examples
back; any change to records, tokenizer or settings tokenizes afresh; a finetune run reports both."""

from __future__ import annotations

import json

from jalora.data.cache import tokenize_cached
from jalora.data.prompts import Prompter, load_template
from jalora.data.records import SAMPLE_DATA, load_records, tokenize_records
from jalora.model.loading import load_tokenizer, resolve_source
from jalora.model.packed_attention import PACKED_SDPA
from jalora.presets import get_preset
from jalora.train.finetune import finetune


def prompter_for(model_dir, family: str) -> Prompter:
    preset = get_preset(family)
    return Prompter(load_template(preset.template), load_tokenizer(resolve_source(str(model_dir)), preset), preset)


def test_cache_hits_only_when_everything_matches(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("JALORA_CACHE_DIR", str(tmp_path / "cache"))
    records = load_records(str(SAMPLE_DATA))[:40]
    llama = prompter_for(tiny_model_dir("elyza-llama2"), "elyza-llama2")
    examples, stats, hit = tokenize_cached(records, llama, 128)
    assert not hit and stats.truncated > 0
    again, again_stats, hit = tokenize_cached(records, llama, 128)
    assert hit and again == examples and again_stats == stats
    assert (again, again_stats) == tokenize_records(records, llama, 128)  # the cache holds what tokenizing gives
    assert not tokenize_cached(records, llama, 256)[2]
    assert not tokenize_cached(records, llama, 128, train_on_inputs=True)[2]
    assert not tokenize_cached(records[:39], llama, 128)[2]
    assert not tokenize_cached(records, prompter_for(tiny_model_dir("swallow"), "swallow"), 128)[2]
    monkeypatch.setenv("JALORA_CACHE_DIR", "off")
    assert not tokenize_cached(records, llama, 128)[2]


def test_finetune_packs_caches_and_records_throughput(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JALORA_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "toy.jsonl"
    rows = [
        {"instruction": f"{t}について一言で。", "input": "", "output": "はい、承知しました。"} for t in "春夏秋冬" * 4
    ]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    runs = []
    for i in range(2):
        runs.append(
            finetune(
                base_model=str(tiny_model_dir("elyza-llama2")),
                data_path=str(data),
                output_dir=str(tmp_path / f"out{i}"),
                batch_size=4,
                micro_batch_size=4,
                max_steps=10,
                learning_rate=1e-2,
                val_set_size=4,
                lora_target_modules="all-linear",
                chunked_ce=True,
                eval_before_training=True,
            )
        )
        out = capsys.readouterr().out
        assert ("(cache)" in out) == (i == 1)
    record = runs[1]
    assert all(record["hyperparameters"][k] for k in ("packing", "supervised_head", "chunked_ce"))
    assert record["hyperparameters"]["attention"] == PACKED_SDPA  # packed rows attend example by example
    assert not record["hyperparameters"]["gradient_checkpointing"]  # off by default without quantization
    metrics = record["metrics"]
    assert metrics["padding_efficiency"] == 1.0 and metrics["tokens_per_s"] > 0
    assert metrics["eval_loss"] < 0.9 * metrics["eval_loss_before"]
