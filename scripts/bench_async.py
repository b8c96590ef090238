"""Asynchronous RL (`max_staleness: k`): seconds per step, idle seconds on each side, and reward.

Part 1, measured on this machine: the CPU demo presets (`configs/rl_cpu_demo_lora_r1.yaml`,
`configs/rl_cpu_demo_full.yaml`) for `--steps` steps at each k in `--ks` and each seed in
`--seeds`, every run a real `rlora rl` in its own process, verification on. Each run keeps its
directory under `--runs` (default runs/bench_async/<arm>-k<k>-s<seed>): a finished run is read
back, not run again, and a killed one resumes, so the grid can be filled over several sittings.
Per (arm, k): median s/step after step 0, the sampler's and the learner's waiting seconds per
step, staleness, reward over the first and the last 3 steps, and the final reward per seed, two
ways: the mean of the last 3 steps, and the mean of the second half of the run (one step's 64
samples swing the reward by +-0.1-0.2 once it saturates, so 3 steps are a noisy final). The k = 0
runs give the seed-to-seed spread the others are held to: the second table puts each k's mean
final beside the range of the k = 0 seeds' finals.
On 2 CPU cores the sampler and the learner share the same cores, so overlap cannot buy speed
here: the table records the overlap (waits) rather than expecting a speed-up.

Part 2, a model, labelled as an estimate: for the 8B GPU presets under `placement: split`, the
plan's estimated sample and learn seconds (`rlora.plan.step_times`) give the synchronous step
(sample + learn + handoff) and the overlapped one (max(sample, learn) + handoff) at k >= 1.

    flock /tmp/rlora-heavy.lock .venv/bin/python scripts/bench_async.py --out bench_async.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from benchlib import REPO, foreign_cpu_share, worker_env

PRESETS = {"lora": REPO / "configs" / "rl_cpu_demo_lora_r1.yaml", "full": REPO / "configs" / "rl_cpu_demo_full.yaml"}
GPU_PRESETS = ("rl_gsm8k_llama3_8b_lora_r1", "rl_gsm8k_llama3_8b_full", "rl_math_llama3_8b_lora_r1", "rl_math_llama3_8b_full")


FOREIGN = "bench_foreign_cpu_share"  # kept in the run directory, so a summary read back later still has it


def loss_override(k: int, loss: str) -> list[str]:
    """The config override a run gets for `--async-loss`: none at k = 0 (held to the preset's `tis`) or for `tis`."""
    return [f"loss={loss}"] if k > 0 and loss != "tis" else []


def run_name(arm: str, k: int, seed: int, loss: str) -> str:
    """The run directory's name: the loss is named when the run overrides the preset's."""
    return f"{arm}-k{k}-s{seed}" + (f"-{loss}" if loss_override(k, loss) else "")


def run_one(arm: str, k: int, seed: int, steps: int, run_dir: Path, quick: bool, loss: str = "tis") -> tuple[list[dict[str, object]], float | None]:
    """One run (or its resumption, or nothing when it is done): its metrics rows and the foreign CPU
    share while it ran (None when unknown: a run finished before the share was recorded)."""
    metrics = run_dir / "metrics.jsonl"
    if (run_dir / "DONE").exists() or (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        recorded = run_dir / FOREIGN
        return read_rows(metrics), float(recorded.read_text()) if recorded.exists() else None
    if (run_dir / "config.json").exists():
        cmd = [sys.executable, "-m", "rlora.cli", "rl", "--resume", str(run_dir)]
    else:
        cmd = [sys.executable, "-m", "rlora.cli", "rl", "--config", str(PRESETS[arm]), f"max_staleness={k}", f"seed={seed}", f"max_steps={steps}"]
        cmd += loss_override(k, loss)
        cmd += ["checkpoint_every=5", f"run_dir={run_dir}"] + (["prompts_per_step=2", "group_size=4", "max_tokens=16"] if quick else [])
    proc, foreign = foreign_cpu_share(lambda: subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"{arm} k={k} seed={seed}: rlora rl failed with exit code {proc.returncode}")
    (run_dir / FOREIGN).write_text(f"{foreign:.4f}\n")
    return read_rows(metrics), foreign


def read_rows(metrics: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def summarize(rows: list[dict[str, object]]) -> dict[str, float]:
    """One run's figures: timings over the steps after step 0, rewards over the first and last 3 steps."""
    steps = [r for r in rows if "reward_mean" in r]
    timed = steps[1:] or steps
    reward = [float(r["reward_mean"]) for r in steps]  # type: ignore[arg-type]

    def median(key: str) -> float:
        return statistics.median(float(r.get(key, 0.0)) for r in timed)  # type: ignore[arg-type]

    return {
        "step_s": median("step_s"),
        "sample_s": median("sample_s"),
        "learn_s": median("learn_s"),
        "sampler_wait_s": median("sampler_wait_s"),
        "learner_wait_s": median("learner_wait_s"),
        "verify_share": statistics.mean(float(r["verify_s"]) / float(r["step_s"]) for r in timed),  # type: ignore[arg-type]
        "staleness_mean": statistics.mean(float(r.get("staleness_mean", 0)) for r in steps),  # type: ignore[arg-type]
        "staleness_max": max(float(r.get("staleness_max", 0)) for r in steps),  # type: ignore[arg-type]
        "reward_first3": statistics.mean(reward[:3]),
        "reward_last3": statistics.mean(reward[-3:]),
        "reward_last_half": statistics.mean(reward[len(reward) // 2 :]),
        "verify_total_share": sum(float(r["verify_s"]) for r in timed) / sum(float(r["step_s"]) for r in timed),  # type: ignore[arg-type]
        "fingerprint_ok": min(float(r.get("fingerprint_ok", 1.0)) for r in steps),  # type: ignore[arg-type]
        "steps": float(len(steps)),
    }


def table(results: dict[str, dict[str, float]], arms: list[str], ks: list[int], seeds: list[int]) -> str:
    rows = [
        "| arm | k | seeds | s/step | sample s | learn s | sampler waits s | learner waits s | staleness mean / max | verify / step "
        "| reward first 3 | final per seed: last 3 | final per seed: second half | final, mean: last 3 / second half |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm in arms:
        for k in ks:
            got = runs_of(results, arm, k, seeds)
            if not got:
                continue

            def mean(key: str, got: list[dict[str, float]] = got) -> float:
                return statistics.mean(g[key] for g in got)

            per_seed = {key: " / ".join(f"{g[key]:.3f}" for g in got) for key in ("reward_last3", "reward_last_half")}
            rows.append(
                f"| {arm} | {k} | {len(got)} | {mean('step_s'):.1f} | {mean('sample_s'):.1f} | {mean('learn_s'):.1f} | {mean('sampler_wait_s'):.1f} "
                f"| {mean('learner_wait_s'):.1f} | {mean('staleness_mean'):.2f} / {max(g['staleness_max'] for g in got):.0f} | {mean('verify_share'):.1%} "
                f"| {mean('reward_first3'):.3f} | {per_seed['reward_last3']} | {per_seed['reward_last_half']} "
                f"| {mean('reward_last3'):.3f} / {mean('reward_last_half'):.3f} |"
            )
    return "\n".join(rows)


def runs_of(results: dict[str, dict[str, float]], arm: str, k: int, seeds: list[int]) -> list[dict[str, float]]:
    return [results[f"{arm}-k{k}-s{s}"] for s in seeds if f"{arm}-k{k}-s{s}" in results]


def reach_table(results: dict[str, dict[str, float]], arms: list[str], ks: list[int], seeds: list[int]) -> str:
    """Does each k >= 1 reach the synchronous final reward? Its mean final against the k = 0 seeds' range."""
    rows = ["| arm | k | final | mean | k = 0 seeds' range | within or above |", "| --- | --- | --- | --- | --- | --- |"]
    for arm in arms:
        sync = runs_of(results, arm, 0, seeds)
        for key, name in (("reward_last3", "last 3"), ("reward_last_half", "second half")):
            low, high = (min(g[key] for g in sync), max(g[key] for g in sync)) if len(sync) > 1 else (float("nan"), float("nan"))
            for k in ks:
                got = runs_of(results, arm, k, seeds)
                if k == 0 or not got:
                    continue
                m = statistics.mean(g[key] for g in got)
                verdict = "n/a (one k = 0 seed)" if len(sync) < 2 else ("yes" if m >= low else "no")
                rows.append(f"| {arm} | {k} | {name} | {m:.3f} | {low:.3f}-{high:.3f} | {verdict} |")
    return "\n".join(rows)


def gpu_model() -> list[dict[str, object]]:
    """The plan's estimated step times for 8B presets under placement split: synchronous vs overlapped (an estimate)."""
    sys.path.insert(0, str(REPO))
    from rlora.plan import gpu_node, load_rl_config, plan_run

    out = []
    for name in GPU_PRESETS:
        cfg = replace(load_rl_config(REPO / "configs" / f"{name}.yaml"), placement="split")
        for gpus, memory in ((8, 80.0), (8, 141.0)):
            t = plan_run(cfg, gpu_node(gpus, memory)).times
            sync = t["sample_s"] + t["learn_s"] + t["handoff_s"]
            overlapped = max(t["sample_s"], t["learn_s"]) + t["handoff_s"]
            out.append({"preset": name, "node": f"{gpus}x{memory:.0f} GB", **{k: round(v, 2) for k, v in t.items()}, "sync_s": sync, "async_s": overlapped})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="*", default=["lora", "full"], choices=list(PRESETS))
    parser.add_argument("--ks", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bench_async", help="run directories (kept; finished runs are read back)")
    parser.add_argument(
        "--async-loss",
        default="tis",
        choices=["tis", "seq_mask", "ppo_clip"],
        help="the loss of the k >= 1 runs (their directories are suffixed with it); the k = 0 runs they are held to keep the preset's tis",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps of a tiny workload, k 0 and 1, one seed")
    parser.add_argument("--only-model", action="store_true", help="print the GPU model only")
    parser.add_argument("--no-run", action="store_true", help="summarize the finished runs only; start or resume none")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.ks, args.seeds, args.steps, args.runs = [0, 1], [0], 3, args.runs.with_name(args.runs.name + "_quick")

    results: dict[str, dict[str, float]] = {}
    contention: dict[str, float | None] = {}
    if not args.only_model:
        for seed in args.seeds:  # seed-major, then k: a sitting cut short still has both arms at the first k's
            for k in args.ks:
                for arm in args.arms:
                    key = f"{arm}-k{k}-s{seed}"
                    run_dir = args.runs / run_name(arm, k, seed, args.async_loss)
                    metrics = run_dir / "metrics.jsonl"
                    if args.no_run and not (metrics.exists() and len(read_rows(metrics)) >= args.steps):
                        continue
                    rows, foreign = run_one(arm, k, seed, args.steps, run_dir, args.quick, args.async_loss)
                    results[key], contention[key] = summarize(rows), foreign
                    r = results[key]
                    print(
                        f"  {run_dir.name}: {r['step_s']:.1f} s/step, waits sampler {r['sampler_wait_s']:.1f} s / learner {r['learner_wait_s']:.1f} s, "
                        f"staleness {r['staleness_mean']:.2f}, reward {r['reward_first3']:.3f} -> {r['reward_last3']:.3f} "
                        f"[other processes took {'?' if foreign is None else f'{foreign:.0%}'} of the CPU]",
                        flush=True,
                    )
        print(f"k >= 1 runs: loss {args.async_loss}; k = 0 runs: tis")
        print(table(results, args.arms, args.ks, args.seeds))
        print()
        print(reach_table(results, args.arms, args.ks, args.seeds))
    model = gpu_model()
    print("\nEstimate (rlora.plan step times, not measured): placement split, synchronous vs overlapped (k >= 1)")
    print("| preset | node | sample s | learn s | handoff s | sync s/step | async s/step | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in model:
        print(
            f"| {m['preset']} | {m['node']} | {m['sample_s']:.0f} | {m['learn_s']:.0f} | {m['handoff_s']:.1f} | {m['sync_s']:.0f} | {m['async_s']:.0f} "
            f"| {float(m['sync_s']) / float(m['async_s']):.2f}x |"  # type: ignore[arg-type]
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"async_loss": args.async_loss, "runs": results, "foreign_cpu_share": contention, "gpu_model_estimate": model}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
