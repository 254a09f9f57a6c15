"""How long a SIGTERM (preemption) takes to end a real run: finetune.py on a real model is sent
SIGTERM as soon as its first checkpoint exists; printed are the checkpoint save time jalora
reports and the seconds from the signal to the exit (the rest of the step + the save).

    PYTHONPATH=. python bench/sigterm_grace.py --base_model smollm2
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", default="smollm2")
    parser.add_argument("--cutoff_len", type=int, default=256)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        flags = {
            "base_model": args.base_model, "data_path": REPO / "data" / "dolly_ja_sample.jsonl", "output_dir": out,
            "batch_size": args.micro_batch_size, "micro_batch_size": args.micro_batch_size,
            "cutoff_len": args.cutoff_len, "max_steps": 1000, "save_steps": 1, "val_set_size": 0,
            "eval_before_training": False,
        }  # fmt: skip
        run = subprocess.Popen(
            [sys.executable, str(REPO / "finetune.py"), *(f"--{k}={v}" for k, v in flags.items())],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        while not list(out.glob("checkpoint-*/jalora-checkpoint.json")):
            if run.poll() is not None:
                raise SystemExit(f"finetune.py ended with {run.returncode}:\n{run.stderr.read()[-3000:]}")
            time.sleep(0.05)
        sent = time.perf_counter()
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate()
        exit_seconds = time.perf_counter() - sent
        message = [line for line in stderr.splitlines() if line.startswith("error:")]
        checkpoint = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
        print(json.dumps({
            "base_model": args.base_model, "exit_code": run.returncode, "signal_to_exit_s": round(exit_seconds, 2),
            "checkpoint_mb": round(size / 1e6, 1), "message": message[-1] if message else stderr[-2000:],
        }, ensure_ascii=False, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
