"""Grading responses: the task's extractors find the final answer(s), `verify` checks them.

`grade` scores one response, `grade_batch` many (in a spawn-based process pool when the batch
is large). The timeout contract is in the `rewards` package docstring.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from itertools import repeat

from rewards.equivalence import DEFAULT_TIMEOUT_S, addresses_grader, verify
from rewards.extract import MAX_RESPONSE_CHARS, candidates, extract_answer, get_task

PARALLEL_MIN_ITEMS = 512  # below this a process pool costs more than it saves


def grade(response: str, gold: str, task: str = "math", timeout: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if the response's final answer(s) match `gold` under the task's policy, else 0.0."""
    policy = get_task(task)
    try:
        if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
            return 0.0
        gold = policy.gold(str(gold))
        if addresses_grader(response):
            return 0.0
        answers = list(dict.fromkeys(candidates(response, task)))
        if not answers or not all(policy.valid(a) for a in answers):
            return 0.0
        deadline = time.monotonic() + timeout
        for answer in answers:
            if not verify(answer, gold, max(0.0, deadline - time.monotonic())):
                return 0.0
        return 1.0
    except Exception:  # noqa: BLE001 (the contract: a verdict, never an exception)
        return 0.0


def _grade_row(args: tuple[str, str, str, float]) -> tuple[float, str | None]:
    response, gold, task, timeout = args
    return grade(response, gold, task, timeout), extract_answer(response, task)


def _iter_graded(
    responses: Sequence[str], golds: Sequence[str], tasks: Sequence[str], workers: int | None, timeout: float
) -> Iterator[tuple[float, str | None]]:
    """(score, extracted answer) per row, in order; parallel when the batch is large."""
    for task in set(tasks):
        get_task(task)
    rows = zip(responses, golds, tasks, repeat(timeout))
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
) -> list[float]:
    """`grade` over pairs, in order. workers=None uses every core for batches of 512 or more."""
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
    return [score for score, _ in _iter_graded(responses, golds, [task] * len(responses), workers, timeout)]
