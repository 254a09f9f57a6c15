"""`--data_path` / `--output_file`: answer every record of a file, resumably.

Answers are appended batch by batch and flushed, in input order, so an interrupted run
leaves a valid prefix of the output; re-running the same command checks that prefix
against the input and carries on after it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from jalora.errors import UserError
from jalora.generate.generator import Generator, Sampling
from jalora.generate.repetition_score import repetition_report
from jalora.outputs import reported_write_failures

ADDED_FIELDS = ("response", "response_base", "repetition")


def read_requests(input_file: str) -> list[dict]:
    """Records with a string `instruction` (and optional `input`), every other field kept."""
    from jalora.data.records import iter_rows

    path = Path(input_file)
    if not path.is_file():
        raise UserError(f"{input_file}: input file not found")
    rows = []
    for where, row in iter_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise UserError(f"{where}: field 'instruction' is missing or not a string")
        rows.append(row)
    return rows


def _without_added(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ADDED_FIELDS}


def answered_count(output_file: Path, rows: list[dict]) -> int:
    """How many leading records the output already answers; a torn last line is cut off."""
    if not output_file.is_file():
        return 0
    raw = output_file.read_bytes()
    if raw and not raw.endswith(b"\n"):  # the run died mid-write: drop the partial line
        raw = raw[: raw.rfind(b"\n") + 1]
        with output_file.open("r+b") as f:
            f.truncate(len(raw))
    lines = raw.decode("utf-8").splitlines()
    if len(lines) > len(rows):
        raise UserError(f"{output_file}: has {len(lines)} answers but the input only {len(rows)} records")
    for number, (line, row) in enumerate(zip(lines, rows), start=1):
        try:
            done = json.loads(line)
        except ValueError:
            done = None
        if not isinstance(done, dict) or "response" not in done or _without_added(done) != _without_added(row):
            raise UserError(
                f"{output_file}:{number}: does not answer input record {number}; "
                "delete the output file or choose another --output_file"
            )
    return len(lines)


def append_whole(fd: int, path: Path, lines: str, answered: int) -> None:
    """Append a batch's answers and fsync; if the write fails (full disk), cut the file back to
    the answers before it, so it holds whole answers only, and say what the batch needs.
    Unbuffered (os.write on a file opened for appending, without a buffer): nothing is left to
    fail again on close."""
    before = os.lseek(fd, 0, os.SEEK_END)
    data = memoryview(lines.encode("utf-8"))
    then = f"; the {answered} answers before it are whole: free space and run the same command again to continue"
    with reported_write_failures(path, lambda: len(data), lambda: os.ftruncate(fd, before), then):
        rest = data
        while rest:
            rest = rest[os.write(fd, rest) :]
        os.fsync(fd)


def answer_file(
    generator: Generator,
    input_file: str,
    output_file: str,
    sampling: Sampling,
    batch_size: int,
    report: bool = False,
    compare: bool = False,
) -> None:
    """Add `response` (and `response_base` with --compare_base, `repetition` with --report) to each record."""
    rows = read_requests(input_file)
    out_path = Path(output_file)
    done = answered_count(out_path, rows)
    if done:
        print(f"{output_file}: {done} of {len(rows)} records already answered; resuming", file=sys.stderr)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("ab", buffering=0) as out, tqdm(total=len(rows), initial=done, unit="record") as bar:
        for start in range(done, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            prompts = [generator.prompter.render(r["instruction"], str(r.get("input") or "")) for r in chunk]
            answers = generator.complete(prompts, sampling)
            results = [{**row, "response": answer} for row, answer in zip(chunk, answers)]
            if compare:
                with generator.adapter_disabled():
                    for result, base in zip(results, generator.complete(prompts, sampling)):
                        result["response_base"] = base
            if report:
                for result in results:
                    result["repetition"] = repetition_report(result["response"])
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
            append_whole(out.fileno(), out_path, lines, start)
            bar.update(len(chunk))
    print(f"wrote {len(rows) - done} answers to {output_file} ({len(rows)} in all)")
