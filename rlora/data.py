"""Training tasks and evaluation benchmarks: rows in, `Problem`s out.

A task is data plus a reward: each `Problem` carries its gold answer and the name of the
`rewards` task that grades it, so `rewards.grade(completion, problem.reference, problem.reward_task)`
is the whole reward. Sources are the Hub datasets for real users or local JSONL files in the
same schema (`train_data=path.jsonl`), so the product never needs the network when given files.

Training tasks (config `task`):
- `arith`: synthetic `a + b` generated in code, the offline default. SmolLM2-135M-Instruct almost
  never boxes an answer, so it is graded by its last number (`rewards` task `number`): about a
  quarter to a half of its samples are right, and most groups of 8 have mixed rewards.
- `gsm8k`: `openai/gsm8k` (config main), answers after `####`.
- `math`: MATH train (`EleutherAI/hendrycks_math`, all subjects) with every MATH500 problem removed
  by its normalised text, since MATH500 is our held-out benchmark.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rlora.rl.types import Prompt, Tokenizer

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
ARITH_INSTRUCTION = "Reply with just the number."


class DataError(ValueError):
    """A missing file, an unknown dataset or a malformed row; the message names which."""


@dataclass(frozen=True)
class Problem:
    """One question with its gold answer and how to grade it."""

    problem_id: str
    question: str  # the user message, instruction included
    reference: str  # gold answer
    reward_task: str  # the rewards task that grades it: math | gsm8k | aime | number
    meta: tuple[tuple[str, str], ...] = ()  # e.g. (("subject", "Algebra"), ("level", "3")) for breakdowns


# --------------------------------------------------------------------------------------------
# Reading rows


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict[str, object]]:
    """Rows of a JSONL file; a bad line or a missing field is an error naming file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    rows: list[dict[str, object]] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataError(f"{path}:{lineno}: missing field {missing[0]!r} (has {sorted(row)})")
            rows.append(row)
    if not rows:
        raise DataError(f"data file {path} has no rows")
    return rows


def load_rows(source: str, hub_config: str | None, split: str, required: Sequence[str]) -> list[dict[str, object]]:
    """A local JSONL path, or a Hub dataset name loaded with `datasets`."""
    if source.endswith(".jsonl") or Path(source).exists():
        return read_jsonl(source, required)
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a core dependency
        raise DataError("loading Hub datasets needs the `datasets` package") from e
    try:
        ds = datasets.load_dataset(source, hub_config, split=split)
    except Exception as e:  # the Hub raises many types; say which dataset failed
        raise DataError(f"could not load dataset {source!r} (config {hub_config!r}, split {split!r}): {e}") from e
    rows = [dict(r) for r in ds]
    for i, row in enumerate(rows):
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{source} row {i}: missing field {missing[0]!r}")
    return rows


def gsm8k_answer(solution: str) -> str:
    """The number after `####` in a GSM8K solution, thousands separators removed."""
    if "####" not in solution:
        raise DataError(f"GSM8K solution has no '#### answer': {solution[-80:]!r}")
    return solution.split("####")[-1].strip().replace(",", "")


def boxed_answer(solution: str) -> str:
    """The last \\boxed{...} of a MATH solution (balanced braces)."""
    start = solution.rfind("\\boxed")
    if start < 0:
        raise DataError(f"MATH solution has no \\boxed answer: {solution[-80:]!r}")
    i = solution.find("{", start)
    depth = 0
    for j in range(i, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[j], 0)
        if depth == 0:
            return solution[i + 1 : j]
    raise DataError(f"unbalanced \\boxed in MATH solution: {solution[start : start + 80]!r}")


def normalize_problem_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


# --------------------------------------------------------------------------------------------
# Training tasks


def arith_problems(n: int, max_operand: int, seed: int) -> list[Problem]:
    """`n` synthetic additions a + b with a, b in 1..max_operand (the offline default task)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        out.append(Problem(f"arith-{i}", f"What is {a} + {b}? {ARITH_INSTRUCTION}", str(a + b), "number"))
    return out


def gsm8k_problems(rows: list[dict[str, object]], prefix: str = "gsm8k") -> list[Problem]:
    return [Problem(f"{prefix}-{i}", f"{row['question']}\n{BOXED_INSTRUCTION}", gsm8k_answer(str(row["answer"])), "gsm8k") for i, row in enumerate(rows)]


def math_problems(rows: list[dict[str, object]], prefix: str = "math", task: str = "math") -> list[Problem]:
    out = []
    for i, row in enumerate(rows):
        answer = str(row["answer"]) if row.get("answer") not in (None, "") else boxed_answer(str(row["solution"]))
        meta = tuple((k, str(row[k])) for k in ("subject", "type", "level") if k in row)
        pid = str(row.get("unique_id") or row.get("id") or f"{prefix}-{i}")
        out.append(Problem(pid, f"{row['problem']}\n{BOXED_INSTRUCTION}", answer, task, meta))
    return out


MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


def load_math_train(source: str, math500_source: str) -> list[Problem]:
    """MATH train minus MATH500, matched on normalised problem text."""
    if source:
        rows = load_rows(source, None, "train", ["problem"])
    else:
        rows = [r for subject in MATH_SUBJECTS for r in load_rows("EleutherAI/hendrycks_math", subject, "train", ["problem", "solution"])]
    held_out = {normalize_problem_text(str(r["problem"])) for r in load_rows(math500_source, None, "test", ["problem"])}
    kept = [r for r in rows if normalize_problem_text(str(r["problem"])) not in held_out]
    return math_problems(kept, prefix="math-train")


@dataclass(frozen=True)
class TaskSpec:
    load: Callable[[str, int, int], list[Problem]]  # (train_data, arith_max, seed) -> problems
    doc: str


TRAIN_TASKS: dict[str, TaskSpec] = {
    "arith": TaskSpec(lambda src, k, seed: arith_problems(100_000, k, seed), "synthetic a + b, graded by last number"),
    "gsm8k": TaskSpec(lambda src, k, seed: gsm8k_problems(load_rows(src or "openai/gsm8k", "main", "train", ["question", "answer"])), "GSM8K train"),
    "math": TaskSpec(lambda src, k, seed: load_math_train(src, "HuggingFaceH4/MATH-500"), "MATH train minus MATH500"),
}


def load_task(task: str, train_data: str, arith_max: int, seed: int) -> list[Problem]:
    if task not in TRAIN_TASKS:
        raise DataError(f"unknown task {task!r}; known: {', '.join(TRAIN_TASKS)}")
    return TRAIN_TASKS[task].load(train_data, arith_max, seed)


# --------------------------------------------------------------------------------------------
# Evaluation benchmarks


@dataclass(frozen=True)
class Benchmark:
    hub_name: str
    hub_config: str | None
    split: str
    filename: str  # name inside --data-dir
    required: tuple[str, ...]
    to_problems: Callable[[list[dict[str, object]]], list[Problem]]


BENCHMARKS: dict[str, Benchmark] = {
    "math500": Benchmark("HuggingFaceH4/MATH-500", None, "test", "math500.jsonl", ("problem", "answer"), lambda rows: math_problems(rows, "math500")),
    "aime24": Benchmark(
        "HuggingFaceH4/aime_2024", None, "train", "aime24.jsonl", ("problem", "answer"), lambda rows: math_problems(rows, "aime24", task="aime")
    ),
    "aime25": Benchmark(
        "opencompass/AIME2025", "AIME2025-I", "test", "aime25.jsonl", ("problem", "answer"), lambda rows: math_problems(rows, "aime25", task="aime")
    ),
    "gsm8k": Benchmark("openai/gsm8k", "main", "test", "gsm8k_test.jsonl", ("question", "answer"), lambda rows: gsm8k_problems(rows, "gsm8k-test")),
}


def load_benchmark(name: str, data_dir: str = "", limit: int = 0) -> list[Problem]:
    """A benchmark's problems from `data_dir/<file>` when given, else from the Hub."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    if data_dir:
        path = Path(data_dir) / bench.filename
        if not path.exists():
            raise DataError(f"benchmark {name!r}: {path} does not exist")
        rows = read_jsonl(path, bench.required)
    else:
        rows = load_rows(bench.hub_name, bench.hub_config, bench.split, bench.required)
    problems = bench.to_problems(rows)
    return problems[:limit] if limit else problems


# --------------------------------------------------------------------------------------------
# Order of training problems


def batch_for_step(problems: Sequence[Problem], step: int, per_step: int, seed: int) -> list[Problem]:
    """The problems of step `step`: a pure function of (step, seed), so a resumed run sees the same data."""
    n = len(problems)
    start = step * per_step
    epoch, offset = divmod(start, n)
    out: list[Problem] = []
    while len(out) < per_step:
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = order[offset : offset + per_step - len(out)]
        out.extend(problems[i] for i in take)
        epoch, offset = epoch + 1, 0
    return out


def make_prompt(problem: Problem, tokenizer: Tokenizer) -> Prompt:
    """The problem as the policy sees it: the user turn under the chat template, as token ids."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": problem.question}], add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return Prompt(problem_id=problem.problem_id, question=problem.question, prompt_ids=tuple(ids), reference=problem.reference, reward_task=problem.reward_task)
