"""`make demo`: rank-1 LoRA and FullFT trained side by side on the CPU default, then compared.

Both arms use the presets `configs/rl_cpu_demo_lora_r1.yaml` and `configs/rl_cpu_demo_full.yaml`:
same model, task, sampler, loss and seed; only the trained parameters and the learning rate
differ. Running it again resumes unfinished arms and skips finished ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlora.config import RLConfig, load_config
from rlora.experiments.plots import plot_metric
from rlora.rl.loop import resume_rl, run_rl
from rlora.runs import RunDir

CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # rlora/experiments/demo.py -> the checkout
ARMS = {"lora_r1": "rl_cpu_demo_lora_r1.yaml", "full": "rl_cpu_demo_full.yaml"}


def run_arm(name: str, preset: str, out: Path, steps: int) -> RunDir:
    path = CONFIGS / preset
    if not path.exists():
        raise FileNotFoundError(f"demo preset {path} is missing (run the demo from a checkout of rlora)")
    run = RunDir(out / name)
    overrides: dict[str, object] = {"max_steps": steps} if steps else {}
    if run.config_path.exists():
        return resume_rl(run.path, overrides)
    cfg = load_config(RLConfig, path, [f"run_dir={run.path}"] + [f"{k}={v}" for k, v in overrides.items()])
    return run_rl(cfg, name)


def summarize(runs: dict[str, RunDir]) -> str:
    lines = [
        "| arm | lr | steps | reward first 3 steps | reward last 3 steps | s/step | sample s | learn s | handoff s | probe gap |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in runs.items():
        rows = [r for r in run.read_metrics() if "reward_mean" in r]  # eval-only rows carry no training stats
        cfg = json.loads(run.config_path.read_text())

        def col(k: str, rows: list[dict[str, object]] = rows) -> np.ndarray:
            return np.array([float(r[k]) for r in rows])  # type: ignore[arg-type]

        lines.append(
            f"| {name} | {cfg['lr']:g} | {len(rows)} | {col('reward_mean')[:3].mean():.3f} | {col('reward_mean')[-3:].mean():.3f} "
            f"| {col('step_s').mean():.1f} | {col('sample_s').mean():.1f} | {col('learn_s').mean():.1f} "
            f"| {col('handoff_s').mean():.3f} | {col('probe_gap').mean():.3f} |"
        )
    return "\n".join(lines)


def main(out: str = "runs/demo", steps: int = 0) -> None:
    out_path = Path(out)
    runs = {name: run_arm(name, preset, out_path, steps) for name, preset in ARMS.items()}
    table = summarize(runs)
    (out_path / "summary.md").write_text(table + "\n")
    metrics = {name: run.read_metrics() for name, run in runs.items()}
    for key in ("reward_mean", "signal_groups", "entropy", "kl_sample_train"):
        plot_metric(metrics, key, out_path / f"{key}.png", full_names=["full"], title=f"{key}: rank-1 LoRA vs FullFT")
    print(table)
    print(f"\nplots and summary in {out_path}/")
