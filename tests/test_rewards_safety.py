"""The timeout contract: bombs are wrong fast, limits hold in threads and processes, nothing raises."""

import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest

from rewards import _limits, grade, verify

BOMB_LIMIT_S = 2.0  # bombs are refused in milliseconds by structural caps; 2 s is a hang guard that a slow or busy machine never hits

BOMBS = {
    "power_tower": r"\boxed{9^{9^{9^{9}}}}",
    "power_tower_10": r"\boxed{10^{10^{10^{10}}}}",
    "two_tower": r"\boxed{2^{2^{2^{2^{2^{2}}}}}}",
    "double_factorial": r"\boxed{100000!!}",
    "factorial_of_factorial": r"\boxed{(10!)!}",
    "symbolic_huge_power": r"\boxed{x^{99999999}}",
    "sci_exponent": r"\boxed{1e999999}",
    "long_literal": r"\boxed{" + "9" * 5000 + "}",
    "megabyte": "x" * 1_000_000 + r"\boxed{3}",
    "megabyte_box": r"\boxed{" + "1+" * 500_000 + "1}",
    "nested_braces": r"\boxed{" + "{" * 10_000 + "3" + "}" * 10_000 + "}",
    "nested_parens": r"\boxed{" + "(" * 5000 + "3" + ")" * 5000 + "}",
    "nested_sqrt": r"\boxed{" + r"\sqrt{" * 300 + "2" + "}" * 300 + "}",
    "huge_matrix": r"\boxed{\begin{pmatrix}" + r" \\ ".join(" & ".join(["1"] * 300) for _ in range(300)) + r"\end{pmatrix}}",
    "many_boxes": r"\boxed{3}" * 5000,
    "long_list": r"\boxed{" + "3," * 50_000 + "3}",
    "answer_is_spam": "the answer is " * 50_000,
    "digits_spam": "1" * 300_000,
    "backslash_spam": "\\" * 300_000,
    "dollar_spam": "$" * 300_000,
    "unclosed_boxes": r"\boxed{" * 50_000,
    # shapes the default policy's closing-statement, last-math and tag extractors must read in linear time
    "answer_then_spaces": "answer" + " " * 300_000,
    "open_answer_tags": "<answer>" * 40_000,
    "open_asy_blocks": "[asy]" * 60_000 + "[/asy]" + "[asy]" * 20_000,
    "hash_run": "#" * 300_000,
    "math_pairs": "$1$ " * 70_000,
    "math_list": "$x=1$, " * 50_000,
    "math_or_paren": "$1$ (or " * 50_000,
    "lead_words": "So " * 100_000,
    "think_closes": "</think>" * 50_000,
    "copulas": "x is " * 60_000,
    "a_lines": "A: " * 100_000,
    "answer_to_spam": "answer to " * 40_000,
}


@pytest.mark.parametrize("name", list(BOMBS))
@pytest.mark.parametrize("task", ["math", "number"])
def test_bomb_is_wrong_quickly(name: str, task: str) -> None:
    t0 = time.perf_counter()
    score = grade(BOMBS[name], "3", task)
    elapsed = time.perf_counter() - t0
    assert score == 0.0
    assert elapsed < BOMB_LIMIT_S, f"{name} took {elapsed:.2f} s"


def test_bombs_as_extracted_answers() -> None:
    for name, text in BOMBS.items():
        t0 = time.perf_counter()
        assert verify(text, "3") is False, name
        assert time.perf_counter() - t0 < BOMB_LIMIT_S, name


# Numerically equal, but slow for sympy's simplify: forces the worker kill path.
SLOW = (r"(\sin^2 x + \cos^2 x)^{24} (x+1)^{24}", "(x+1)^{24}")


def _count_kills(monkeypatch: pytest.MonkeyPatch | None = None) -> list[int]:
    """Count `_limits` worker kills in this process (a missed kill would let sympy run on: seconds)."""
    kills: list[int] = []
    original = _limits._Worker.kill

    def counting(self: _limits._Worker) -> None:
        kills.append(1)
        original(self)

    if monkeypatch is None:
        _limits._Worker.kill = counting  # type: ignore[method-assign]  # a spawned child: nothing to restore
    else:
        monkeypatch.setattr(_limits._Worker, "kill", counting)
    return kills


def test_sympy_timeout_kills_worker_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    verify(r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}")  # a warm worker, so start-up is not timed
    kills = _count_kills(monkeypatch)
    t0 = time.perf_counter()
    assert verify(*SLOW, timeout=0.2) is True  # undecided by sympy in time: numeric check decides
    assert kills == [1], "the late worker must be killed at the deadline"
    assert time.perf_counter() - t0 < 30.0  # a hang guard only: the kill above is what the contract says
    assert verify(r"\frac{\sqrt{5}}{5}", r"\frac{1}{\sqrt{5}}") is True  # a fresh worker serves next
    assert verify(r"\frac{\sqrt{5}}{4}", r"\frac{1}{\sqrt{5}}") is False


def _mixed_jobs() -> list[tuple[str, str, float]]:
    jobs = [(BOMBS["power_tower"], "3", 0.0), (BOMBS["nested_braces"], "3", 0.0)]
    jobs += [(rf"\boxed{{\frac{{\sqrt{{{k}}}}}{{{k}}}}}", rf"\frac{{1}}{{\sqrt{{{k}}}}}", 1.0) for k in (2, 3, 5, 6, 7)]
    jobs += [(rf"\boxed{{{k}}}", str(k), 1.0) for k in range(20)] + [(rf"\boxed{{{k}}}", str(k + 1), 0.0) for k in range(20)]
    jobs += [(r"\boxed{" + SLOW[0] + "}", SLOW[1], 1.0)]
    return jobs


def test_threads_agree_with_sequential_and_stay_bounded() -> None:
    jobs = _mixed_jobs()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(lambda j: (grade(j[0], j[1], timeout=0.5), time.perf_counter()), j) for j in jobs]
        results = [f.result() for f in futures]
    assert [score for score, _ in results] == [expected for _, _, expected in jobs]
    # bombs finish at once, before the slow job that other threads wait on sympy for
    assert max(results[0][1], results[1][1]) < results[-1][1]
    assert time.perf_counter() - t0 < 60.0  # a hang guard, not a speed test


def test_bomb_in_a_thread() -> None:
    with ThreadPoolExecutor(2) as pool:
        t0 = time.perf_counter()
        scores = list(pool.map(lambda s: grade(s, "3"), [BOMBS["power_tower"], BOMBS["double_factorial"]]))
    assert scores == [0.0, 0.0]
    assert time.perf_counter() - t0 < 2 * BOMB_LIMIT_S


def _slow_in_child(timeout: float) -> tuple[bool, int]:
    verify(r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}")  # start this process's sympy worker
    kills = _count_kills()
    return verify(*SLOW, timeout=timeout), len(kills)


def test_timeout_holds_in_worker_processes() -> None:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        results = list(pool.map(_slow_in_child, [0.2, 0.2]))
    for ok, kills in results:
        assert ok is True and kills == 1  # each child killed its late worker at the deadline


def test_random_strings_never_raise() -> None:
    rng = random.Random(7)
    alphabet = list("0123456789+-*/^_{}()[]|!,.=<>%&$ xyzie") + [
        r"\frac",
        r"\sqrt",
        r"\pi",
        r"\boxed{",
        r"\pm",
        r"\left(",
        r"\right)",
        r"\cdot",
        r"\infty",
        r"\{",
        r"\}",
        r"\begin{pmatrix}",
        r"\end{pmatrix}",
        r"\\",
        r"\text{",
        " or ",
        r"\cup",
        r"\le",
        r"\log_",
        "e10",
        "#### ",
    ]
    t0 = time.perf_counter()
    for _ in range(400):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        g = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12)))
        for task in ("math", "gsm8k", "aime", "number"):
            assert grade(s, g, task, timeout=0.3) in (0.0, 1.0)
        assert verify(s, g, timeout=0.3) in (True, False)
    assert time.perf_counter() - t0 < 30
