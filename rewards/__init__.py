"""rewards: a standalone math answer checker (no torch, no rlora; sympy only in a subprocess).

    >>> import rewards
    >>> rewards.grade(r"... so the answer is $\\boxed{\\dfrac{1}{2}}$.", "0.5")
    1.0
    >>> rewards.verify(r"x = \\frac{3}{2}", "1.5")
    True

API
- `grade(response, gold, task="math", timeout=1.0, policy="default") -> float` in {0.0, 1.0}:
  finds the final answer(s) with the extraction policy for the task (`TASKS`: math, gsm8k,
  aime, number) and checks it against the gold (a gold written as text, e.g. with boxes, is
  read with the same extraction).
- `verify(answer, gold, timeout=1.0) -> bool` for an already-extracted answer.
- `extract_answer(response, task="math", policy="default") -> str | None`.
- `grade_batch(responses, golds, task="math", workers=None, timeout=1.0, policy="default")`:
  a spawn-based process pool for large batches, sequential for small ones.
- Extraction policies: `POLICIES` ("default": box, "final answer" phrases, the last math...;
  "strict": boxes only), `POLICY_VERSION`, and `describe_policy(name) -> str`, a stable
  description with the version for run records (e.g. "rewards/default/v2: ...").

Scoring rules: see `extract` (which answers count, in which order) and `equivalence` (what is
equal, what is a hedge). A response with several final answers scores 1 only if all of them
are right, or if the gold has several parts and together they spell it.

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
from rewards.extract import POLICIES, POLICY_VERSION, TASKS, describe_policy, extract_answer
from rewards.grading import grade, grade_batch

__all__ = [  # noqa: RUF022 (in the order of the docstring)
    "grade",
    "verify",
    "extract_answer",
    "grade_batch",
    "TASKS",
    "POLICIES",
    "POLICY_VERSION",
    "describe_policy",
]
