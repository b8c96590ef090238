"""K LoRA runs on one engine (`rlora rl-multi`) against the same K runs done separately.

Runs: run k is rank 1 (k even) or rank 8 (k odd), lr 1e-3, seed k // 2, on the CPU demo task
(`configs/rl_cpu_demo_lora_r1.yaml`) with a small workload: 4 prompts x 4 samples x 32 tokens per
run and step, 3 steps (step 0 is the warm-up; steps 1-2 are timed), no checkpoints, bf16.

  one engine  one process: `rlora.rl.multi.run_multi` with runs 0..K-1 (one engine with K adapters,
              one base with K adapters and K optimizers, one sampling call per step)
  separate    K processes one after another, process k running `rlora.rl.loop.run_rl` on run k alone.
              Run k's work does not depend on K, so the eight single runs are done once and the
              set of K separate runs is runs 0..K-1 of them.

Per K: samples per second over the timed steps (K x 16 per step), seconds per step for the whole
set (one engine: its step_s; separate: the sum of the runs' step_s) and per run (set / K), peak
RSS (one engine: its process; separate: the largest process, since they run one after another),
wall seconds of the whole work (model load and engine start included: once against K times),
and each as a ratio one engine / separate, all measured in this invocation. With K = 1 the two
arms do the same computation, so the bench also checks that run 0's rewards are identical.

    flock /tmp/rlora-heavy.lock .venv/bin/python scripts/bench_multi.py --out bench_multi.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchlib import REPO, emit_result, run_worker

PRESET = REPO / "configs" / "rl_cpu_demo_lora_r1.yaml"
KS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Work:
    prompts: int = 4
    samples: int = 4
    tokens: int = 32
    steps: int = 3  # step 0 warms up

    def overrides(self) -> dict[str, object]:
        return {"prompts_per_step": self.prompts, "group_size": self.samples, "max_tokens": self.tokens, "max_steps": self.steps, "checkpoint_every": 0}


QUICK = Work(prompts=2, samples=2, tokens=8, steps=2)


def run_overrides(k: int) -> dict[str, object]:
    return {"rank": (1, 8)[k % 2], "lr": 1e-3, "seed": k // 2}


@dataclass(frozen=True)
class Result:
    """One worker process: per run, its metrics rows (step, step_s, reward_mean); the peak RSS; its wall time."""

    rows: list[list[dict[str, float]]]
    peak_rss_mb: float
    wall_s: float  # the whole process's work: model and engine start included


# ------------------------------------------------------------------------------------ workers


def _rows(run_dir: Path) -> list[dict[str, float]]:
    from rlora.runs import RunDir

    return [{k: float(r[k]) for k in ("step", "step_s", "sample_s", "learn_s", "reward_mean")} for r in RunDir(run_dir).read_metrics()]  # type: ignore[arg-type]


def worker(mode: str, k: int, work: Work) -> Result:
    """mode 'multi': runs 0..k-1 on one engine; 'single': run k alone."""
    start = time.perf_counter()
    import yaml

    from rlora.config import RLConfig, from_dict, load_yaml
    from rlora.rl.loop import run_rl
    from rlora.rl.multi import run_multi

    with tempfile.TemporaryDirectory(prefix="rlora-bench-multi-") as tmp:
        if mode == "multi":
            spec = {"base": str(PRESET), "out": f"{tmp}/out", "fixed": work.overrides(), "runs": [run_overrides(i) for i in range(k)]}
            (Path(tmp) / "multi.yaml").write_text(yaml.safe_dump(spec))
            runs = [r.path for r in run_multi(Path(tmp) / "multi.yaml", progress=False)]
        else:
            cfg = from_dict(RLConfig, {**load_yaml(PRESET), **work.overrides(), **run_overrides(k), "run_dir": f"{tmp}/run"})
            runs = [run_rl(cfg, progress=False).path]
        rows = [_rows(r) for r in runs]
    return Result(rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - start)


# ------------------------------------------------------------------------------------ driver


def timed_step_s(rows: list[dict[str, float]]) -> float:
    """Mean step_s over the steps after the warm-up."""
    return statistics.mean(r["step_s"] for r in rows[1:] or rows)


@dataclass(frozen=True)
class Row:
    k: int
    multi_samples_s: float
    separate_samples_s: float
    multi_set_step_s: float
    separate_set_step_s: float
    multi_rss_mb: float
    separate_rss_mb: float
    multi_wall_s: float
    separate_wall_s: float

    def cells(self) -> list[str]:
        m, s = self.multi_set_step_s, self.separate_set_step_s
        return [
            str(self.k),
            f"{self.multi_samples_s:.1f} / {self.separate_samples_s:.1f} = {self.multi_samples_s / self.separate_samples_s:.2f}x",
            f"{m:.2f} / {s:.2f} = {m / s:.2f}",
            f"{m / self.k:.2f} / {s / self.k:.2f}",
            f"{self.multi_rss_mb:.0f} / {self.separate_rss_mb:.0f} = {self.multi_rss_mb / self.separate_rss_mb:.2f}",
            f"{self.multi_wall_s:.0f} / {self.separate_wall_s:.0f} = {self.multi_wall_s / self.separate_wall_s:.2f}",
        ]


def compare(k: int, multi: Result, singles: list[Result], work: Work) -> Row:
    per_step = k * work.prompts * work.samples
    multi_step = timed_step_s(multi.rows[0])  # step_s is the whole set's in every run's rows
    separate_step = sum(timed_step_s(s.rows[0]) for s in singles[:k])
    return Row(
        k,
        per_step / multi_step,
        per_step / separate_step,
        multi_step,
        separate_step,
        multi.peak_rss_mb,
        max(s.peak_rss_mb for s in singles[:k]),
        multi.wall_s,
        sum(s.wall_s for s in singles[:k]),
    )


def table(rows: list[Row]) -> str:
    head = "| K | samples/s: one engine / separate | s/step, whole set: one / separate | s/step per run: one / separate | peak RSS MB: one / separate | wall s, starts included: one / separate |"
    return "\n".join([head, "| --- | --- | --- | --- | --- | --- |", *("| " + " | ".join(r.cells()) + " |" for r in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", type=int, nargs="*", default=list(KS))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (2 x 2 x 8 tokens, 2 steps)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        emit_result(asdict(worker(job["mode"], job["k"], Work(**job["work"]))))
        return

    work = QUICK if args.quick else Work()
    print(f"per run and step: {work.prompts} prompts x {work.samples} samples x {work.tokens} tokens; {work.steps} steps, the first untimed", flush=True)
    contention: dict[str, float] = {}
    script = str(Path(__file__).resolve())
    singles = []
    for k in range(max(args.ks)):
        singles.append(Result(**run_worker(script, {"mode": "single", "k": k, "work": asdict(work)}, f"single run {k}", contention)))  # type: ignore[arg-type]
    rows, multis = [], {}
    for k in args.ks:
        multis[k] = Result(**run_worker(script, {"mode": "multi", "k": k, "work": asdict(work)}, f"one engine K={k}", contention))  # type: ignore[arg-type]
        rows.append(compare(k, multis[k], singles, work))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if 1 in multis:
        same = [r["reward_mean"] for r in multis[1].rows[0]] == [r["reward_mean"] for r in singles[0].rows[0]]
        print(f"K=1: run 0's rewards on one engine {'are identical to' if same else 'DIFFER from'} its rewards alone", flush=True)
    if args.out:
        payload = {
            "work": asdict(work),
            "rows": [asdict(r) for r in rows],
            "multi": {k: asdict(m) for k, m in multis.items()},
            "single": [asdict(s) for s in singles],
            "foreign_cpu_share": contention,
        }
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
