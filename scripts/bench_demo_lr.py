"""The CPU demo's reward curves, rank-1 LoRA vs FullFT (and rank 8), each at its best learning rate.

    python scripts/bench_demo_lr.py [--sweep runs/sweep_rl_cpu] [--docs docs/demo_lr]

Runs (or resumes) the RL sweep `configs/sweep_rl_cpu.yaml`: the demo task at five learning
rates per arm, a half decade apart, LoRA's range about 30x above FullFT's. Each arm's best
learning rate is the one with the highest final reward (mean over the last 20% of steps, as
`rlora analyze` scores RL sweeps); the table lists every run, and the PNGs show the reward
curves at each arm's best learning rate and all of them. The ratio of the best LoRA learning
rate to FullFT's is the CPU-scale counterpart of the blog's ~10x. `rlora analyze` on the same
directory draws the U-curves (the shape of the blog's Figure 6).

Run it under the machine's heavy-job lock; the sweep takes about 30 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rlora.experiments.analyze import METRICS, RunResult, read_results
from rlora.experiments.plots import plot_metric
from rlora.experiments.sweep import load_sweep, run_sweep
from rlora.runs import RunDir

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "configs" / "sweep_rl_cpu.yaml"


def arm_name(rank: int | str) -> str:
    return "FullFT" if rank == "full" else f"LoRA r{rank}"


def mean_of(rows: Sequence[dict[str, object]], key: str, part: slice) -> float:
    return float(np.mean([float(r[key]) for r in rows[part]]))  # type: ignore[arg-type]


def table(results: Sequence[RunResult], best: dict[str, RunResult]) -> str:
    lines = [
        "| arm | lr | reward, first 2 steps | final reward | s/step | best |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(results, key=lambda r: (arm_name(r.rank), r.lr)):
        rows = RunDir(r.run_dir).read_metrics()
        first = mean_of(rows, "reward_mean", slice(0, 2))
        step_s = mean_of(rows, "step_s", slice(None))
        mark = "**yes**" if best[arm_name(r.rank)] is r else ""
        lines.append(f"| {arm_name(r.rank)} | {r.lr:g} | {first:.3f} | {r.value:.3f} | {step_s:.1f} | {mark} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="", help="sweep directory (default: the sweep file's out)")
    parser.add_argument("--docs", default="", help="write demo_lr.md and PNGs here (default: the sweep directory)")
    parser.add_argument("--no-run", action="store_true", help="only report what the sweep directory holds")
    args = parser.parse_args()
    sweep = load_sweep(SWEEP, args.sweep or None)
    if not args.no_run:
        run_sweep(sweep)
    results, unfinished = read_results(sweep.out, METRICS["rl"])
    if unfinished:
        print(f"not finished (run again to go on): {', '.join(unfinished)}")
    best: dict[str, RunResult] = {}
    for r in results:
        arm = arm_name(r.rank)
        if arm not in best or r.value > best[arm].value:
            best[arm] = r
    text = table(results, best)
    if "FullFT" in best:
        for arm, r in sorted(best.items()):
            if arm != "FullFT":
                text += f"\n\nbest {arm} lr / best FullFT lr = {r.lr / best['FullFT'].lr:g}"
    print(text)
    dest = Path(args.docs) if args.docs else sweep.out
    dest.mkdir(parents=True, exist_ok=True)
    curves = {f"{arm} (lr {r.lr:g})": RunDir(r.run_dir).read_metrics() for arm, r in sorted(best.items())}
    full = [name for name in curves if name.startswith("FullFT")]
    plot_metric(curves, "reward_mean", dest / "demo_lr_best_reward.png", full_names=full, title="reward, each arm at its best lr")
    every = {f"{arm_name(r.rank)} lr {r.lr:g}": RunDir(r.run_dir).read_metrics() for r in sorted(results, key=lambda r: (str(r.rank), r.lr))}
    full = [name for name in every if name.startswith("FullFT")]
    plot_metric(every, "reward_mean", dest / "demo_lr_all_reward.png", full_names=full, title="reward, every run of the sweep")
    (dest / "demo_lr.md").write_text(text + "\n")
    summary = {arm: {"lr": r.lr, "final_reward": r.value} for arm, r in best.items()}
    (sweep.out / "best_lr.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
