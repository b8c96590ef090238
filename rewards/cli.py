"""Command line: `rewards check` for one pair, `rewards batch` for a JSONL file.

    rewards check '... so $\\boxed{\\frac12}$' '0.5' --task math
    {"score": 1.0, "extracted": "\\frac12"}

    rewards batch in.jsonl out.jsonl --task gsm8k --workers 4

Batch input rows are JSON objects with `response` and `gold` (a string or a number) and an
optional `task` that overrides --task. Each output row is the input row plus `score` and
`extracted`, in input order, written and flushed as soon as it is graded, so an interrupted run
keeps everything already done. Blank lines are skipped.

Malformed rows (not JSON, not an object, missing or non-string `response`, missing `gold`,
unknown `task`) are not fatal: they are written with `"score": null, "extracted": null` and an
`"error"` naming the line number, reported on stderr, and make the command exit with status 1
after every other row has been graded. Exit status 2 means bad arguments or unreadable files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rewards.equivalence import DEFAULT_TIMEOUT_S
from rewards.extract import POLICIES, TASKS
from rewards.grading import _iter_graded, extract_answer, grade


@dataclass(frozen=True)
class _Row:
    """One input line: the parsed object, or the reason it could not be graded."""

    line: int
    data: dict
    response: str = ""
    gold: str = ""
    task: str = ""
    error: str | None = None


def _read_row(line_no: int, text: str, default_task: str) -> _Row:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return _Row(line_no, {"raw": text}, error=f"line {line_no}: not valid JSON ({e.msg})")
    if not isinstance(data, dict):
        return _Row(line_no, {"raw": data}, error=f"line {line_no}: expected a JSON object")
    response, gold, task = data.get("response"), data.get("gold"), data.get("task", default_task)
    if not isinstance(response, str):
        return _Row(line_no, data, error=f"line {line_no}: 'response' must be a string")
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        gold = str(gold)
    if not isinstance(gold, str):
        return _Row(line_no, data, error=f"line {line_no}: 'gold' must be a string or a number")
    if task not in TASKS:
        return _Row(line_no, data, error=f"line {line_no}: unknown task {task!r} (known: {', '.join(TASKS)})")
    return _Row(line_no, data, response, gold, task)


def _progress(items: Iterable[_Row], total: int, quiet: bool) -> Iterable[_Row]:
    if quiet:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, unit="row", file=sys.stderr)


def _batch(args: argparse.Namespace) -> int:
    try:
        lines = Path(args.input).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        print(f"rewards batch: cannot read {args.input}: {e}", file=sys.stderr)
        return 2
    rows = [_read_row(i, text, args.task) for i, text in enumerate(lines, 1) if text.strip()]
    good = [r for r in rows if r.error is None]
    results: Iterator[tuple[float, str | None]] = _iter_graded(
        [r.response for r in good],
        [r.gold for r in good],
        [r.task for r in good],
        args.workers,
        args.timeout,
        args.policy,
    )
    errors: list[str] = []
    try:
        out = open(args.output, "w", encoding="utf-8")  # noqa: SIM115 (closed below)
    except OSError as e:
        print(f"rewards batch: cannot write {args.output}: {e}", file=sys.stderr)
        return 2
    with out:
        for row in _progress(rows, len(rows), args.quiet):
            if row.error is None:
                score, extracted = next(results)
                record = {**row.data, "score": score, "extracted": extracted}
            else:
                errors.append(row.error)
                record = {**row.data, "score": None, "extracted": None, "error": row.error}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
    for error in errors:  # after the progress bar, so that both stay readable
        print(f"rewards batch: {error}", file=sys.stderr)
    if errors:
        print(f"rewards batch: {len(errors)} malformed row(s) written with an 'error' field", file=sys.stderr)
    return 1 if errors else 0


def _check(args: argparse.Namespace) -> int:
    score = grade(args.response, args.gold, args.task, args.timeout, args.policy)
    extracted = extract_answer(args.response, args.task, args.policy)
    print(json.dumps({"score": score, "extracted": extracted}, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rewards", description="Grade math answers.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="grade one response against one gold answer")
    check.add_argument("response")
    check.add_argument("gold")
    batch = sub.add_parser("batch", help="grade a JSONL file of {response, gold[, task]} rows")
    batch.add_argument("input")
    batch.add_argument("output")
    batch.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    for p in (check, batch):
        p.add_argument("--task", default="math", choices=sorted(TASKS))
        p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="sympy seconds per call")
        p.add_argument("--policy", default="default", choices=sorted(POLICIES), help="extraction policy")
    args = parser.parse_args(argv)
    return _check(args) if args.command == "check" else _batch(args)


if __name__ == "__main__":
    sys.exit(main())
