"""Training stages beyond SFT on tiny stand-ins: DPO widens the chosen-over-rejected margin on
held-out prompts, ORPO trains and saves, continued pre-training lowers held-out perplexity,
preference ids follow the SFT token rules, and bad data of each kind fails with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jalora.data.preference import load_pairs, tokenize_pairs
from jalora.data.pretrain import DocumentPackCollator, load_documents, pack_documents, tokenize_documents
from jalora.data.prompts import Prompter, load_template
from jalora.errors import UserError
from jalora.evaluate.heldout import evaluate as evaluate_cli
from jalora.model.loading import load_tokenizer, resolve_source
from jalora.presets import get_preset
from jalora.train.finetune import finetune as finetune_cli

finetune = finetune_cli.__wrapped__  # in-process: the UserError itself, not the CLI's exit
evaluate = evaluate_cli.__wrapped__

TOPICS = ["東京", "富士山", "寿司", "新幹線", "桜", "京都", "将棋", "温泉", "俳句", "味噌汁", "相撲", "紅葉"]
HELD_OUT = ["大阪", "北海道", "抹茶", "落語"]
TINY_RUN = dict(
    batch_size=4, micro_batch_size=2, learning_rate=5e-3, lora_target_modules="all-linear", warmup_steps=0,
    logging_steps=1, eval_steps=1000, save_steps=1000, seed=3,
)  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def pairs(topics: list[str]) -> list[dict]:
    """A toy preference: a polite one-line answer over a curt refusal."""
    return [
        {"instruction": f"{t}について一言で。", "input": "", "chosen": f"{t}は有名です。", "rejected": "知りません。"}
        for t in topics
    ]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("pairs")
    return write_jsonl(root / "train.jsonl", pairs(TOPICS * 2)), write_jsonl(root / "val.jsonl", pairs(HELD_OUT))


def test_dpo_widens_the_held_out_margin_against_the_base(tiny_model_dir, pair_files, tmp_path):
    train, val = pair_files
    out = tmp_path / "dpo"
    record = finetune(
        base_model=str(tiny_model_dir("elyza-llama2")), data_path=train, val_data_path=val, output_dir=str(out),
        stage="dpo", beta=0.1, max_steps=10, **TINY_RUN,
    )  # fmt: skip
    m = record["metrics"]
    print(f"DPO held-out log-prob margin {m['eval_logp_margin_before']:.3f} -> {m['eval_logp_margin']:.3f}, "
          f"reward accuracy {m['eval_reward_accuracy']:.2f}, reward margin {m['eval_reward_margin']:.3f}")  # fmt: skip
    # before training the policy is the reference: no reward, and the base's own log-prob margin
    assert m["eval_reward_margin_before"] == pytest.approx(0.0, abs=1e-4)
    assert m["eval_logp_margin"] > m["eval_logp_margin_before"] + 1.0, m
    assert m["eval_reward_accuracy"] == 1.0 and m["eval_reward_margin"] > 0.1, m
    assert record["stage"] == "dpo" and record["hyperparameters"]["loss_type"] == "sigmoid"
    saved = json.loads((out / "jalora.json").read_text(encoding="utf-8"))
    assert saved["metrics"]["eval_reward_accuracy"] == 1.0
    assert not (out / "ref").exists(), "only the trained adapter is saved"
    assert "reward accuracy" in (out / "README.md").read_text(encoding="utf-8")


def test_orpo_trains_and_saves(tiny_model_dir, pair_files, tmp_path):
    train, val = pair_files
    out = tmp_path / "orpo"
    record = finetune(
        base_model=str(tiny_model_dir("open-calm")), data_path=train, val_data_path=val, output_dir=str(out),
        stage="orpo", max_steps=8, **TINY_RUN,
    )  # fmt: skip
    m = record["metrics"]
    assert m["eval_loss"] < m["eval_loss_before"], m
    assert m["eval_logp_margin"] > m["eval_logp_margin_before"], m
    assert (out / "adapter_model.safetensors").is_file() and record["stage"] == "orpo"


def test_preference_ids_are_the_sft_ids(tiny_model_dir, pair_files):
    """The prompt plus each reply is exactly the SFT example of that reply, eos last, no pad inside."""
    from jalora.data.records import load_records, tokenize_records

    source = resolve_source(str(tiny_model_dir("elyza-llama2")))
    preset = get_preset("elyza-llama2")
    tokenizer = load_tokenizer(source, preset)
    prompter = Prompter(load_template(preset.template), tokenizer, preset)
    examples, _ = tokenize_pairs(load_pairs(pair_files[1]), prompter, 512)
    sft_rows = [dict(r, output=r["chosen"]) for r in pairs(HELD_OUT)]
    sft_path = Path(pair_files[1]).with_name("sft.jsonl")
    sft, _ = tokenize_records(load_records(write_jsonl(sft_path, sft_rows)), prompter, 512)
    for pair, example in zip(examples, sft):
        assert pair["prompt_ids"] + pair["chosen_ids"] == example["input_ids"]
        assert pair["chosen_ids"][-1] == pair["rejected_ids"][-1] == tokenizer.eos_token_id
        assert tokenizer.pad_token_id not in pair["chosen_ids"] + pair["rejected_ids"]
        assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_chat_pairs_render_through_the_chat_template(tiny_model_dir, tmp_path):
    source = resolve_source(str(tiny_model_dir("qwen2.5")))
    preset = get_preset("qwen2.5")
    tokenizer = load_tokenizer(source, preset)
    prompter = Prompter(load_template(preset.template), tokenizer, preset)
    messages = [{"role": "user", "content": "富士山の高さは？"}]
    rows = [
        {"messages": messages, "chosen": [{"role": "assistant", "content": "3776メートルです。"}], "rejected": "高い。"}
    ]
    (pair,), _ = tokenize_pairs(load_pairs(write_jsonl(tmp_path / "chat.jsonl", rows)), prompter, 512)
    assert prompter.decode(pair["prompt_ids"]) == prompter.decode(prompter.encode([prompter.render_chat(messages)])[0])
    assert prompter.decode(pair["chosen_ids"]) == "3776メートルです。"


def test_pt_lowers_held_out_perplexity(tiny_model_dir, tmp_path):
    docs = [f"{t}は日本の名物です。{t}を見に多くの人が訪れます。" for t in TOPICS]
    (tmp_path / "train.txt").write_text("\n\n".join(docs * 2) + "\n", encoding="utf-8")
    held_out = [{"text": f"{t}は日本の名物です。{t}を見に多くの人が訪れます。"} for t in HELD_OUT]
    record = finetune(
        base_model=str(tiny_model_dir("elyza-llama2")), data_path=str(tmp_path / "train.txt"),
        val_data_path=write_jsonl(tmp_path / "val.jsonl", held_out), output_dir=str(tmp_path / "pt"),
        stage="pt", cutoff_len=64, max_steps=12, **{**TINY_RUN, "learning_rate": 2e-2},
    )  # fmt: skip
    m = record["metrics"]
    print(f"pt held-out perplexity {m['eval_perplexity_before']:.1f} -> {m['eval_perplexity']:.1f}")
    assert m["eval_perplexity"] < 0.6 * m["eval_perplexity_before"], m
    assert record["stage"] == "pt" and record["hyperparameters"]["packing"] is True
    # `jalora evaluate` scores every token of the held-out text: the same perplexity, and the base's
    scores = evaluate(lora_weights=str(tmp_path / "pt"), data_path=str(tmp_path / "val.jsonl"), compare_base=True)
    assert scores["adapter"]["overall"]["perplexity"] == pytest.approx(m["eval_perplexity"], rel=1e-3)
    assert scores["base"]["overall"]["perplexity"] == pytest.approx(m["eval_perplexity_before"], rel=1e-3)


def test_pt_packs_documents_with_restarting_positions(tiny_model_dir, tmp_path):
    (tmp_path / "docs.txt").write_text("一つ目の文書。\n二行目。\n\n\n二つ目の文書。\n", encoding="utf-8")
    documents = load_documents(str(tmp_path / "docs.txt"))
    assert [d.text for d in documents] == ["一つ目の文書。\n二行目。", "二つ目の文書。"]
    assert [d.where.rsplit(":", 1)[1] for d in documents] == ["1", "5"]
    source = resolve_source(str(tiny_model_dir("elyza-llama2")))
    preset = get_preset("elyza-llama2")
    prompter = Prompter(load_template(preset.template), load_tokenizer(source, preset), preset)
    pieces = tokenize_documents(documents, prompter, cutoff_len=64)
    eos = prompter.tokenizer.eos_token_id
    assert all(p["input_ids"][-1] == eos and p["labels"] == p["input_ids"] for p in pieces)
    (row,) = pack_documents(pieces, cutoff_len=64)
    batch = DocumentPackCollator()([row])
    n = len(pieces[0]["input_ids"])
    positions = batch["position_ids"][0].tolist()
    assert positions[:n] == list(range(n)) and positions[n] == 0
    assert batch["labels"][0, n].item() == -100  # a document's first token is never predicted from the previous one
    assert torch.equal(batch["labels"][0, n + 1 :], batch["input_ids"][0, n + 1 :])


BAD_INPUTS = [
    ("dpo", {"instruction": "質問", "chosen": "答え"}, r"bad.jsonl:2: field 'rejected' is missing"),
    ("dpo", {"prompt": "質問", "rejected": "答え"}, r"bad.jsonl:2: field 'chosen' is missing"),
    (
        "orpo",
        {"prompt": "質問", "chosen": "同じ", "rejected": "同じ"},
        r"bad.jsonl:2: field 'rejected' equals 'chosen'",
    ),
    ("pt", {"text": "  "}, r"bad.jsonl:2: field 'text' is empty"),
]


@pytest.mark.parametrize(("stage", "bad_row", "message"), BAD_INPUTS)
def test_bad_records_fail_with_file_line_and_field(tiny_model_dir, tmp_path, stage, bad_row, message):
    good = pairs(["東京"])[0] if stage != "pt" else {"text": "東京は日本の首都です。"}
    data = write_jsonl(tmp_path / "bad.jsonl", [good, bad_row])
    with pytest.raises(UserError, match=message):
        finetune(
            base_model=str(tiny_model_dir("open-calm")), data_path=data, output_dir=str(tmp_path / "o"), stage=stage
        )
    assert not (tmp_path / "o").exists()


def test_stage_and_data_mismatch_names_the_record_and_the_stage(tiny_model_dir, tmp_path):
    base = str(tiny_model_dir("open-calm"))
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(["東京"]))
    with pytest.raises(UserError, match=r"pairs.jsonl:1: this is a preference pair .* --stage pt .*use --stage dpo"):
        finetune(base_model=base, data_path=data, output_dir=str(tmp_path / "o"), stage="pt")
    (tmp_path / "notes.txt").write_text("社内文書です。\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"notes.txt:1: this is plain text .* --stage dpo .*use --stage pt"):
        finetune(base_model=base, data_path=str(tmp_path / "notes.txt"), output_dir=str(tmp_path / "o"), stage="dpo")
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "質問", "output": "答え"}])
    with pytest.raises(UserError, match=r"sft.jsonl:1: this is an instruction record .* use --stage sft"):
        finetune(base_model=base, data_path=sft, output_dir=str(tmp_path / "o"), stage="orpo")
    with pytest.raises(UserError, match=r"--loss_type is a DPO setting"):
        finetune(base_model=base, data_path=data, output_dir=str(tmp_path / "o"), stage="orpo", loss_type="ipo")
    with pytest.raises(UserError, match=r"unknown --stage 'rl'"):
        finetune(base_model=base, data_path=data, output_dir=str(tmp_path / "o"), stage="rl")


DPO_RESUME = dict(
    batch_size=4, micro_batch_size=2, num_epochs=2, learning_rate=5e-3, val_set_size=0, save_steps=4, logging_steps=1,
    warmup_steps=0, seed=7, stage="dpo",
)  # fmt: skip


def test_dpo_after_sft_killed_and_resumed_equals_an_uninterrupted_run(tiny_model_dir, pair_files, tmp_path):
    """SFT adapter → DPO with --base_adapter; one DPO run is SIGKILLed after checkpoint-4 and resumed."""
    import os
    import signal
    import subprocess
    import sys

    from test_resume import REPO, assert_same_adapter, signal_when, write_data

    base = str(tiny_model_dir("open-calm"))
    sft = tmp_path / "sft"
    sft_data = write_data(tmp_path / "sft.jsonl")
    finetune(base_model=base, data_path=sft_data, output_dir=str(sft), max_steps=4, batch_size=4, micro_batch_size=4,
             val_set_size=0, lora_target_modules="all-linear", learning_rate=1e-2)  # fmt: skip
    run = {**DPO_RESUME, "base_model": base, "data_path": pair_files[0], "base_adapter": str(sft)}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "finetune.py"), *[f"--{k}={v}" for k, v in {**run, "output_dir": killed}.items()]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    fired: list = []
    watcher = signal_when(proc, killed / "checkpoint-4", signal.SIGKILL, fired)
    reference = tmp_path / "reference"
    record = finetune(output_dir=str(reference), **run)
    proc.communicate(timeout=300)
    watcher.join()
    assert fired == [True] and proc.returncode == -signal.SIGKILL
    finetune(output_dir=str(killed), resume_from_checkpoint=True, **run)
    assert_same_adapter(killed, reference)
    assert record["base_adapter"] == str(sft) and record["lora"]["r"] == 8
    sft_weights = json.loads((sft / "adapter_config.json").read_text(encoding="utf-8"))
    assert sorted(sft_weights["target_modules"]) == record["lora"]["target_modules"]


@pytest.mark.slow
def test_smollm2_dpo_after_the_demo_sft_adapter(tmp_path):
    """The real SmolLM2-135M: the demo's short SFT run, then DPO on a few pairs (the sample's own
    answer over a curt non-answer) continuing that adapter; the held-out margin grows."""
    from jalora.demo import short_run

    sample = [json.loads(line) for line in (Path(__file__).resolve().parents[1] / "data" / "dolly_ja_sample.jsonl")
              .read_text(encoding="utf-8").splitlines()]  # fmt: skip
    short = [r for r in sample if not r["input"] and len(r["output"]) < 60][:20]
    rows = [{"instruction": r["instruction"], "chosen": r["output"], "rejected": "わかりません。"} for r in short]
    train, val = write_jsonl(tmp_path / "train.jsonl", rows[:16]), write_jsonl(tmp_path / "val.jsonl", rows[16:])
    short_run(str(tmp_path / "sft"), max_steps=20, base_model="smollm2")
    record = finetune(
        base_model="smollm2", base_adapter=str(tmp_path / "sft"), data_path=train, val_data_path=val,
        output_dir=str(tmp_path / "dpo"), stage="dpo", batch_size=4, micro_batch_size=2, max_steps=8,
        learning_rate=5e-4, cutoff_len=256, warmup_steps=0, logging_steps=1, save_steps=100, eval_steps=100,
    )  # fmt: skip
    m = record["metrics"]
    assert m["eval_logp_margin"] > m["eval_logp_margin_before"] + 1.0, m
    assert m["eval_reward_accuracy"] >= 0.75 and m["eval_reward_margin"] > 0, m
