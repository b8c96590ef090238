"""Every real gold answer grades 1 against itself and 0 against another row's gold.

Data: ../shared/data (MATH500, AIME 2024/25, GSM8K test, every row) where the checkout has it,
else the few dozen rows of each committed in tests/data, so a clone alone runs it too. Each row is
paired with one other row, (i * 7 + 3) mod n, so the test stays fast. A pair is skipped when
the two golds are the same answer spelled differently; `_same_answer` decides that with a
deliberately simple rule that does not use `rewards` (no circularity), plus SAME_ANSWER, the
allow-list of pairs that the simple rule cannot see.
"""

import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from rewards import grade

SHARED = Path(__file__).parents[1].parent / "shared" / "data"
DATA = SHARED if (SHARED / "math500.jsonl").exists() else Path(__file__).parent / "data"

# Pairs of MATH500 golds that are the same answer in a way _same_answer does not catch.
SAME_ANSWER: set[frozenset[str]] = set()


def _load(name: str) -> list[dict]:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _simple_key(s: str) -> str | Fraction:
    """A plain-text key: spaces, sizing, thousands marks, degrees, \\text and x= removed."""
    s = re.sub(r"\\left|\\right|\\!|\\,|\s|\^\\circ|\^\{\\circ\}|\\\$|\$", "", s)
    s = re.sub(r"\\(?:text|mbox)\{[^{}]*\}", "", s).replace(r"\dfrac", r"\frac")
    s = re.sub(r"^[a-z]=", "", s)
    m = re.fullmatch(r"(-?)\\frac\{?(\d+)\}?\{?(\d+)\}?", s)
    if m:
        return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1)
    if re.fullmatch(r"-?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?", s) and re.search(r"\d", s):
        return Fraction(s.replace(",", ""))
    return s


def _same_answer(a: str, b: str) -> bool:
    return _simple_key(a) == _simple_key(b) or frozenset((a, b)) in SAME_ANSWER


def _check_rows(golds: list[str], task: str, wrap: str) -> None:
    n = len(golds)
    failures = []
    for i, gold in enumerate(golds):
        if grade(wrap.format(gold), gold, task) != 1.0:
            failures.append(f"row {i}: {gold!r} does not match itself")
        other = golds[(i * 7 + 3) % n]
        if not _same_answer(gold, other) and grade(wrap.format(other), gold, task) != 0.0:
            failures.append(f"row {i}: {other!r} accepted for gold {gold!r}")
    assert not failures, "\n".join(failures)


def test_math500_golds() -> None:
    golds = [r["answer"] for r in _load("math500.jsonl")]
    _check_rows(golds, "math", "The final answer is $\\boxed{{{}}}$.")


def test_math500_reference_solutions_grade_one() -> None:
    """The reference solution's own last box matches the answer column (real full responses)."""
    rows = _load("math500.jsonl")
    failures = [r["unique_id"] for r in rows if grade(r["solution"], r["answer"], "math") != 1.0]
    assert len(failures) <= len(rows) // 50, f"{len(failures)} solutions fail: {failures}"


def test_aime_golds() -> None:
    golds = [str(r["answer"]) for r in _load("aime24.jsonl") + _load("aime25.jsonl")]
    _check_rows(golds, "aime", "\\boxed{{{}}}")


def test_gsm8k_golds() -> None:
    rows = _load("gsm8k_test.jsonl")
    golds = [r["answer"].split("####")[-1].strip() for r in rows]
    _check_rows(golds, "gsm8k", "The answer is $\\boxed{{{}}}$.")
    # the dataset's own solutions, graded against the full answer column, score 1
    assert all(grade(r["answer"], r["answer"], "gsm8k") == 1.0 for r in rows[:200])


def test_math500_solutions_without_boxes() -> None:
    """The default policy finds most final answers of real solutions with every box removed
    (closing statements, last math), and never accepts another problem's gold."""
    rows = _load("math500.jsonl")
    box = re.compile(r"\\boxed\{((?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*)\}")
    found, accepted_other = 0, []
    for i, r in enumerate(rows):
        text = box.sub(lambda m: m.group(1), r["solution"])
        found += grade(text, r["answer"]) == 1.0
        other = rows[(i * 7 + 11) % len(rows)]["answer"]
        if not _same_answer(other, r["answer"]) and grade(text, other) == 1.0:
            accepted_other.append(r["unique_id"])
    assert found >= 0.8 * len(rows), f"only {found} of {len(rows)} unboxed solutions graded correct"
    assert not accepted_other, accepted_other


BENCH_DIR = Path(__file__).parents[1] / "scripts" / "data"


@pytest.mark.parametrize("name", ["rewards_bench.jsonl", "rewards_bench_real.jsonl"])
def test_benchmark_sets_have_no_false_positives(name: str) -> None:
    """The labelled benchmark sets: no false positive, and at most 1% wrong (bombs excluded for speed)."""
    rows = [json.loads(line) for line in (BENCH_DIR / name).read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r["category"] != "bomb"]
    scores = [grade(r["response"], r["gold"], r["task"]) for r in rows]
    wrong = [(r["category"], r["gold"], r["response"][-80:]) for r, s in zip(rows, scores) if s != r["label"]]
    false_positives = [(r["category"], r["gold"]) for r, s in zip(rows, scores) if r["label"] == 0 and s == 1.0]
    assert not false_positives, false_positives
    assert len(wrong) <= len(rows) // 100, wrong
