"""What every benchmark script shares: one job per worker process, and a contention gauge.

Each benchmark runs its measurements in fresh worker processes (`python bench_x.py --worker
JSON`): every side gets a clean torch, and vLLM's in-process engine is not torn down cleanly.
A worker prints one line `RLORA_BENCH_RESULT <json>`; `run_worker` returns that JSON.

The machine is shared; jobs that skip the heavy-job lock still compete for its two cores and
inflate every timing, so `run_worker` also measures the share of the CPU that other processes
took while the worker ran, and the scripts print and save it beside their results.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
RESULT_MARKER = "RLORA_BENCH_RESULT "
T = TypeVar("T")


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker: this checkout first on the import path.

    A worker's sys.path[0] is scripts/, so without this `rlora` and `rewards` come from however
    the package was installed (an editable install made before rewards/__init__.py existed
    serves `rewards` as an empty namespace package).
    """
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def cpu_busy_s() -> float:
    """CPU seconds every process on the machine has used since boot (/proc/stat, all cores)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and of its finished workers."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def foreign_cpu_share(run: Callable[[], T]) -> tuple[T, float]:
    """run() and the share of the machine's CPU that other processes used meanwhile (0 = quiet)."""
    busy, own, wall = cpu_busy_s(), own_cpu_s(), time.perf_counter()
    result = run()
    elapsed = time.perf_counter() - wall
    foreign = (cpu_busy_s() - busy) - (own_cpu_s() - own)
    return result, max(0.0, foreign) / (elapsed * (os.cpu_count() or 1))


def emit_result(payload: object) -> None:
    """The worker's side: hand `payload` (JSON-able) back to `run_worker`."""
    print(RESULT_MARKER + json.dumps(payload), flush=True)


def run_worker(script: str, job: object, label: str, contention: dict[str, float], env: dict[str, str] | None = None) -> object:
    """Run `script --worker <job as JSON>` in a fresh process; its emitted payload.

    `contention[label]` gets the CPU share other processes took meanwhile.
    """
    command = [sys.executable, script, "--worker", json.dumps(job)]
    run = lambda: subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=worker_env(env))  # noqa: E731
    proc, foreign = foreign_cpu_share(run)
    contention[label] = foreign
    print(f"  [{label}: other processes took {foreign:.0%} of the CPU meanwhile]", flush=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"{label}: worker failed with exit code {proc.returncode}")
    return json.loads(lines[-1][len(RESULT_MARKER) :])
