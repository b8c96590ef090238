"""Grading responses: the task's extractors find the final answer(s), `verify` checks them.

`grade` scores one response, `grade_batch` many (in a spawn-based process pool when the batch
is large). The timeout contract is in the `rewards` package docstring.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from itertools import repeat

from rewards.equivalence import DEFAULT_TIMEOUT_S, addresses_grader, join_parts, verify
from rewards.extract import (
    MAX_RESPONSE_CHARS,
    _is_prose,
    answer_tags,
    boxed,
    candidates,
    extract_answer,
    get_policy,
    get_task,
    unescape_latex,
)

PARALLEL_MIN_ITEMS = 512  # below this a process pool costs more than it saves


def read_gold(gold: str, task: str = "math") -> str:
    """The gold column as one answer string: a gold written as text (`\\boxed{1} papers and
    \\boxed{2} bins`, a whole solution) is read with the same extraction as a response."""
    gold = unescape_latex(get_task(task).gold(str(gold)))
    if "boxed" in gold or "fbox" in gold or "<answer>" in gold:
        found = list(dict.fromkeys(answer_tags(gold) or boxed(gold)))
        if found and all(found):
            return found[0] if len(found) == 1 else ", ".join(found)
    if len(gold) > 80 and _is_prose(gold, 6):
        found = candidates(gold, task)
        if found and found[-1]:
            return found[-1]
    return gold


def grade(response: str, gold: str, task: str = "math", timeout: float = DEFAULT_TIMEOUT_S, policy: str = "default") -> float:
    """1.0 if the response's final answer(s) match `gold` under the task and policy, else 0.0.

    Several different final answers score 1 only if each is right, or, when the gold has several
    parts, if together they spell it (`\\boxed{-2} and \\boxed{1}` for `1, -2`).
    """
    spec = get_task(task)
    get_policy(policy)
    try:
        if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
            return 0.0
        gold = read_gold(gold, task)
        if addresses_grader(response):
            return 0.0
        answers = list(dict.fromkeys(candidates(response, task, policy)))
        if not answers or not all(spec.valid(a) for a in answers):
            return 0.0
        deadline = time.monotonic() + timeout
        if all(verify(a, gold, max(0.0, deadline - time.monotonic())) for a in answers):
            return 1.0
        joined = join_parts(answers, gold)
        if joined is not None and verify(joined, gold, max(0.0, deadline - time.monotonic())):
            return 1.0
        return 0.0
    except Exception:  # noqa: BLE001 (the contract: a verdict, never an exception)
        return 0.0


def _grade_row(args: tuple[str, str, str, float, str]) -> tuple[float, str | None]:
    response, gold, task, timeout, policy = args
    return grade(response, gold, task, timeout, policy), extract_answer(response, task, policy)


def _iter_graded(
    responses: Sequence[str],
    golds: Sequence[str],
    tasks: Sequence[str],
    workers: int | None,
    timeout: float,
    policy: str = "default",
) -> Iterator[tuple[float, str | None]]:
    """(score, extracted answer) per row, in order; parallel when the batch is large."""
    for task in set(tasks):
        get_task(task)
    get_policy(policy)
    rows = zip(responses, golds, tasks, repeat(timeout), repeat(policy))
    workers = os.cpu_count() or 1 if workers is None else workers
    if workers <= 1 or len(responses) < PARALLEL_MIN_ITEMS:
        yield from map(_grade_row, rows)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the caller may hold threads and locks (tqdm, torch, our worker pool).
    chunk = max(1, min(256, len(responses) // (workers * 8)))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_grade_row, rows, chunksize=chunk)


def grade_batch(
    responses: Sequence[str],
    golds: Sequence[str],
    task: str = "math",
    workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    policy: str = "default",
) -> list[float]:
    """`grade` over pairs, in order. workers=None uses every core for batches of 512 or more."""
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
    graded = _iter_graded(responses, golds, [task] * len(responses), workers, timeout, policy)
    return [score for score, _ in graded]
