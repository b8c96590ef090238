"""The `rewards` command line, `grade_batch` with worker processes, and the import contract."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import rewards
from rewards import grade, grade_batch
from rewards.grading import PARALLEL_MIN_ITEMS

ROOT = Path(__file__).parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rewards.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_import_pulls_in_no_heavy_modules() -> None:
    code = "import sys, rewards; heavy = [m for m in ['torch', 'transformers', 'vllm', 'rlora', 'sympy', 'numpy'] if m in sys.modules]; assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_public_api_is_short() -> None:
    assert rewards.__all__ == [
        "grade",
        "verify",
        "extract_answer",
        "grade_batch",
        "TASKS",
        "POLICIES",
        "POLICY_VERSION",
        "describe_policy",
    ]


def test_check_prints_score_and_extraction() -> None:
    out = _cli("check", r"so $\boxed{\frac12}$", "0.5")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"score": 1.0, "extracted": r"\frac12"}
    out = _cli("check", "2 + 2 = 4", "4", "--task", "number")
    assert json.loads(out.stdout) == {"score": 1.0, "extracted": "4"}
    out = _cli("check", "no answer", "4")
    assert json.loads(out.stdout) == {"score": 0.0, "extracted": None}
    out = _cli("check", "The answer is 4.", "4", "--policy", "strict")
    assert json.loads(out.stdout) == {"score": 0.0, "extracted": None}
    out = _cli("check", "The answer is 4.", "4")
    assert json.loads(out.stdout) == {"score": 1.0, "extracted": "4"}


def test_batch_writes_rows_and_reports_malformed_lines(tmp_path: Path) -> None:
    lines = [
        json.dumps({"response": r"\boxed{3}", "gold": "3", "id": 1}),
        "this is not json",
        "",
        json.dumps({"response": "the answer is 5", "gold": 5, "task": "number"}),
        json.dumps({"response": 3, "gold": "3"}),
        json.dumps({"response": "x", "gold": "3", "task": "bogus"}),
        json.dumps({"response": r"\boxed{4}", "gold": "3"}),
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = _cli("batch", str(src), str(dst), "--quiet")
    assert out.returncode == 1
    assert "line 2: not valid JSON" in out.stderr and "line 5:" in out.stderr and "line 6:" in out.stderr
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["score"] for r in rows] == [1.0, None, 1.0, None, None, 0.0]
    assert rows[0] == {"response": r"\boxed{3}", "gold": "3", "id": 1, "score": 1.0, "extracted": "3"}
    assert rows[1]["error"].startswith("line 2:")
    assert rows[2]["extracted"] == "5"


def test_batch_clean_file_exits_zero(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"response": f"#### {k}", "gold": str(k)}) + "\n" for k in range(50)))
    out = _cli("batch", str(src), str(dst), "--task", "gsm8k", "--workers", "1")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["score"] for line in dst.read_text().splitlines()] == [1.0] * 50


def test_missing_input_file_is_a_clear_error(tmp_path: Path) -> None:
    out = _cli("batch", str(tmp_path / "missing.jsonl"), str(tmp_path / "out.jsonl"))
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_console_script_if_installed() -> None:
    script = Path(sys.executable).parent / "rewards"
    if not script.exists():
        pytest.skip("console script not installed")
    out = subprocess.run([str(script), "check", r"\boxed{3}", "3"], capture_output=True, text=True, timeout=60, check=False)
    assert json.loads(out.stdout)["score"] == 1.0, out.stderr


def test_grade_batch_with_workers_matches_sequential() -> None:
    n = PARALLEL_MIN_ITEMS + 88
    responses = [rf"The answer is $\boxed{{\frac{{{k}}}{{2}}}}$." for k in range(n)]
    golds = [str(k / 2) if k % 3 else str(k) for k in range(n)]
    expected = [grade(r, g) for r, g in zip(responses, golds)]
    assert grade_batch(responses, golds, workers=2) == expected
    assert grade_batch(responses[:10], golds[:10]) == expected[:10]  # small: sequential
    with pytest.raises(ValueError):
        grade_batch(responses, golds[:-1])
