"""rewards: a standalone math answer checker (no torch, no rlora; sympy only in a subprocess).

    >>> import rewards
    >>> rewards.grade(r"... so the answer is $\\boxed{\\dfrac{1}{2}}$.", "0.5")
    1.0
    >>> rewards.verify(r"x = \\frac{3}{2}", "1.5")
    True

API
- `grade(response, gold, task="math", timeout=1.0) -> float` in {0.0, 1.0}: finds the final
  answer(s) with the task's policy (`extract.TASKS`: math, gsm8k, aime, number) and checks it.
- `verify(answer, gold, timeout=1.0) -> bool` for an already-extracted answer.
- `extract_answer(response, task="math") -> str | None`.
- `grade_batch(responses, golds, task="math", workers=None, timeout=1.0) -> list[float]`:
  a spawn-based process pool for large batches, sequential for small ones.

Scoring rules: see `extract` (which answers count) and `equivalence` (what is equal, what is a
hedge). A response with several final answers scores 1 only if all of them are right.

Timeout contract
- No input string makes these functions raise (a wrong `task` name raises ValueError).
- Pure-Python work (extraction, parsing, exact and numeric checks) is bounded by structural
  caps on sizes (response length, answer length, nesting, number of items, digits, exponents,
  factorials), not by a clock: an input over a cap is wrong at once, in milliseconds.
- Symbolic work runs in sympy worker subprocesses (`_limits`) under a hard wall-clock limit:
  `timeout` seconds per grade/verify call, measured with `time.monotonic()`, enforced by
  killing the worker. It works the same from the main thread, other threads and worker
  processes (no signals). When sympy has not decided in time, a numeric comparison at fixed
  pseudo-random points decides, so a verdict always comes back.
- A call therefore returns within `timeout` plus a few milliseconds, except that the first
  symbolic check in a process (and the first after a kill) also waits for a worker to import
  sympy (about 0.5 s, at most `_limits.STARTUP_S`).
"""

from rewards.equivalence import verify
from rewards.extract import TASKS, extract_answer
from rewards.grading import grade, grade_batch

__all__ = ["grade", "verify", "extract_answer", "grade_batch", "TASKS"]
