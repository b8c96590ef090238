"""The CPU demo's reward curves, rank-1 LoRA vs FullFT, each at its best of three learning rates.

    python scripts/bench_demo_lr.py [--steps 12] [--out runs/bench_demo_lr] [--docs docs]

Runs the two demo presets at three learning rates each (LoRA around 10x FullFT's, as the blog
finds), skipping runs already finished, then picks each arm's best learning rate by the mean
reward of its last three steps, and writes a table and reward-vs-step PNGs. The ratio of the two
best learning rates is the CPU-scale counterpart of the blog's ~10x.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rlora.config import RLConfig, load_config
from rlora.plots import plot_metric
from rlora.rl import resume_rl, run_rl
from rlora.runs import RunDir

REPO = Path(__file__).resolve().parents[1]
ARMS = {
    "lora_r1": ("rl_cpu_demo_lora_r1.yaml", (3e-4, 1e-3, 3e-3)),
    "full": ("rl_cpu_demo_full.yaml", (1e-5, 3e-5, 1e-4)),
}


def final_reward(rows: list[dict[str, object]]) -> float:
    return float(np.mean([float(r["reward_mean"]) for r in rows[-3:]]))  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default="runs/bench_demo_lr")
    parser.add_argument("--docs", default="", help="also write demo_lr.md and PNGs here")
    args = parser.parse_args()
    out = Path(args.out)
    results: dict[str, dict[float, list[dict[str, object]]]] = {}
    for arm, (preset, lrs) in ARMS.items():
        results[arm] = {}
        for lr in lrs:
            run = RunDir(out / f"{arm}-lr{lr:g}")
            if run.config_path.exists():
                if len(run.read_metrics()) < args.steps:
                    resume_rl(run.path, {"max_steps": args.steps})
            else:
                cfg = load_config(RLConfig, REPO / "configs" / preset, [f"lr={lr}", f"max_steps={args.steps}", f"run_dir={run.path}", "checkpoint_every=0"])
                run_rl(cfg, name=arm)
            results[arm][lr] = run.read_metrics()

    lines = ["| arm | lr | reward first 3 | reward last 3 | s/step | best |", "| --- | --- | --- | --- | --- | --- |"]
    best: dict[str, float] = {}
    for arm, by_lr in results.items():
        best[arm] = max(by_lr, key=lambda lr: final_reward(by_lr[lr]))
        for lr, rows in by_lr.items():
            first = float(np.mean([float(r["reward_mean"]) for r in rows[:3]]))  # type: ignore[arg-type]
            step_s = float(np.mean([float(r["step_s"]) for r in rows]))  # type: ignore[arg-type]
            lines.append(f"| {arm} | {lr:g} | {first:.3f} | {final_reward(rows):.3f} | {step_s:.1f} | {'yes' if lr == best[arm] else ''} |")
    ratio = best["lora_r1"] / best["full"]
    table = "\n".join(lines) + f"\n\nbest LoRA lr / best FullFT lr = {ratio:g}\n"
    print(table)
    curves = {f"{arm} (lr {best[arm]:g})": results[arm][best[arm]] for arm in results}
    dest = Path(args.docs) if args.docs else out
    dest.mkdir(parents=True, exist_ok=True)
    full_name = [n for n in curves if n.startswith("full")]
    plot_metric(curves, "reward_mean", dest / "demo_lr_best_reward.png", full_names=full_name, title="reward, each arm at its best of 3 lrs")
    all_curves = {f"{arm} lr {lr:g}": rows for arm, by_lr in results.items() for lr, rows in by_lr.items()}
    plot_metric(all_curves, "reward_mean", dest / "demo_lr_all_reward.png", full_names=[n for n in all_curves if n.startswith("full")], title="reward, all six runs", smooth=3)
    (dest / "demo_lr.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"best": best, "ratio": ratio, "steps": args.steps}, indent=2))


if __name__ == "__main__":
    main()
