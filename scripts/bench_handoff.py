"""Learner-to-sampler handoff and its verification: seconds per policy version, and their shares of a real RL step.

Arms: LoRA rank 1, 8, 64 and FullFT, engine and learner in `--dtype` (default: the demo's `auto`,
bf16 where the CPU computes it natively, float32 elsewhere).

Two measurements per arm, each in its own process (a fresh in-process vLLM engine; one at a time):
  handoff   a `Learner` and a `Sampler` side by side; before each version the trainable weights
            move a little (LoRA B, or every FullFT weight, plus small noise) so every version is a
            real change, then `rlora.rl.handoff.publish` hands it over and checks it on the probe:
            handoff_s (write the adapter + add_lora, or reload_weights + prefix-cache reset),
            verify_s (probe_s: the probe scored by both sides; fingerprint_s: every worker's
            fingerprints of what it serves, the learner's, and the comparison), probe_gap. One
            warm-up version (it also checks a LoRA engine's base once), then the median of `--reps`.
  step      a real run: `rlora.rl.loop.run_rl` with the demo preset (`configs/rl_cpu_demo_lora_r1.yaml`
            with `rank=R` for LoRA, `configs/rl_cpu_demo_full.yaml` for FullFT), `max_steps=3`,
            no checkpoints; from its metrics.jsonl the median step_s and handoff_s of the steps
            after step 0 (step 0 carries the engine's and the learner's first-call warm-up).
The shares are handoff_s / step_s and verify_s / step_s within the same run (targets: 5% each);
verify_s is reported apart, since it is a safety check rather than the transfer itself.

Run it under the machine's heavy-job lock:
    flock /tmp/rlora-heavy.lock .venv/bin/python scripts/bench_handoff.py --out bench_handoff.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from benchlib import REPO, emit_result, run_worker

PRESETS = {"lora": REPO / "configs" / "rl_cpu_demo_lora_r1.yaml", "full": REPO / "configs" / "rl_cpu_demo_full.yaml"}
ARMS = ("r1", "r8", "r64", "full")
TARGET_SECONDS = 0.5
TARGET_SHARE = 0.05


def arm_rank(arm: str) -> int | None:
    """ "r8" -> 8, "full" -> None."""
    return None if arm == "full" else int(arm.removeprefix("r"))


@dataclass(frozen=True)
class Job:
    kind: str
    """"handoff" (publish micro-benchmark) or "step" (a real run_rl)."""
    arm: str
    """r1 | r8 | r64 | full"""
    reps: int
    """handoff: timed versions after one warm-up; step: max_steps."""
    quick: bool
    """Tiny step workload (2 prompts x 2 samples x 8 tokens) for a smoke run."""
    dtype: str = "auto"
    """Engine and learner precision (auto: as the demo resolves it on this machine)."""


@dataclass(frozen=True)
class HandoffResult:
    arm: str
    payload_mb: float
    """Bytes handed over per version: the adapter file, or every weight as the learner holds it."""
    handoff_s: list[float]
    verify_s: list[float]
    probe_gap: list[float]
    probe_s: list[float]
    fingerprint_s: list[float]
    """Both sides' fingerprints and their comparison (part of verify_s)."""
    fingerprint_tensors: float
    """(worker, tensor) pairs compared per version."""
    fingerprint_fraction: list[float]
    """Per version: the share of the packed GEMMs' columns read back (1 = whole; LoRA: always 1)."""

    def verify(self, whole: bool) -> float:
        """Median verify_s over the versions read back whole (or sampled); all versions when there are none."""
        picked = [v for v, f in zip(self.verify_s, self.fingerprint_fraction) if (f >= 1) == whole]
        return statistics.median(picked or self.verify_s)


@dataclass(frozen=True)
class StepResult:
    arm: str
    rows: list[dict[str, float]]
    """Per step: step_s, sample_s, grade_s, learn_s, handoff_s, verify_s, probe_s, fingerprint_s, fingerprint_fraction."""

    def timed(self, key: str) -> float:
        """Median over the steps after step 0 (all steps if there is only one)."""
        rows = self.rows[1:] or self.rows
        return statistics.median(r[key] for r in rows)

    def verify_amortized(self, full_every: int) -> float:
        """verify_s per step in a run that reads everything back every `full_every`-th version and a
        sample otherwise, from this run's own steps of each kind after step 0 (the run alternates)."""
        rows = self.rows[1:] or self.rows
        whole = [r["verify_s"] for r in rows if r["fingerprint_fraction"] >= 1]
        sampled = [r["verify_s"] for r in rows if r["fingerprint_fraction"] < 1]
        if not whole or not sampled:
            return statistics.median(r["verify_s"] for r in rows)
        return ((full_every - 1) * statistics.median(sampled) + statistics.median(whole)) / full_every


# ------------------------------------------------------------------------------------ workers


def publisher(learner: object, sampler: object) -> Callable[[int], dict[str, float]]:
    """`rlora.rl.handoff.publish` bound to this learner, sampler and a probe that alternates whole and
    sampled FullFT read-backs (odd versions at the config default `fingerprint_fraction`)."""
    from rlora.config import RLConfig
    from rlora.rl import handoff as rl

    probe = rl.make_probe(sampler.tokenizer, sampler.spec.dtype, fingerprint_fraction=RLConfig().fingerprint_fraction, fingerprint_full_every=2)  # type: ignore[attr-defined]
    return lambda version: rl.publish(learner, sampler, version, probe)  # type: ignore[arg-type]


def run_handoff(job: Job) -> HandoffResult:
    import torch

    from rlora.devices import resolve_dtype
    from rlora.engine.sampler import EngineSpec, Sampler
    from rlora.train import lora
    from rlora.train.learner import Learner, LearnerSpec
    from rlora.train.models import resolve_model

    model_path = resolve_model("default")
    rank = arm_rank(job.arm)
    spec = lora.LoRASpec(rank=rank) if rank is not None else None
    dtype = resolve_dtype(job.dtype, "cpu")[0]
    learner = Learner(LearnerSpec(model_path=model_path, lora=spec, lr=1e-4, dtype=dtype))
    sampler = Sampler(EngineSpec(model_path=model_path, device="cpu", dtype=dtype, lora_rank=rank, max_num_seqs=16))
    publish = publisher(learner, sampler)
    trainable = lora.lora_parameters(learner.model)[1] if spec is not None else learner.trainable
    generator = torch.Generator().manual_seed(0)

    def nudge() -> None:
        """A new policy: LoRA B or every FullFT weight moves by a small relative amount."""
        with torch.no_grad():
            for p in trainable:
                scale = 1e-3 if spec is not None else 1e-3 * float(p.abs().mean())
                p.add_(torch.randn(p.shape, generator=generator) * scale)

    stats = []
    for version in range(job.reps + 1):
        nudge()
        stats.append(publish(version))
    stats = stats[1:]  # version 0 is the warm-up
    if spec is not None:
        adapter = Path(sampler._lora.lora_path) / lora.WEIGHTS_FILE  # the live version's file
        payload = adapter.stat().st_size
    else:
        payload = sum(p.numel() * p.element_size() for _, p in learner.weights())
    sampler.close()
    return HandoffResult(
        job.arm,
        payload / 1e6,
        [s["handoff_s"] for s in stats],
        [s["verify_s"] for s in stats],
        [s["probe_gap"] for s in stats],
        [s["probe_s"] for s in stats],
        [s["fingerprint_s"] for s in stats],
        stats[-1]["fingerprint_tensors"],
        [s["fingerprint_fraction"] for s in stats],
    )


def run_step(job: Job) -> StepResult:
    from rlora.config import RLConfig, load_config
    from rlora.rl.loop import run_rl

    rank = arm_rank(job.arm)
    preset = PRESETS["full"] if rank is None else PRESETS["lora"]
    with tempfile.TemporaryDirectory(prefix="rlora-bench-handoff-") as tmp:
        # whole and sampled FullFT read-backs alternate, so the run measures both (verify_amortized)
        overrides = [f"max_steps={job.reps}", "checkpoint_every=0", f"run_dir={tmp}/run", f"dtype={job.dtype}", "fingerprint_full_every=2"]
        overrides += [] if rank is None else [f"rank={rank}"]
        if job.quick:
            overrides += ["prompts_per_step=2", "group_size=2", "max_tokens=8"]
        run = run_rl(load_config(RLConfig, preset, overrides), progress=False)
        keys = ("step_s", "sample_s", "grade_s", "learn_s", "handoff_s", "verify_s", "probe_s", "fingerprint_s", "fingerprint_fraction")
        rows = [{k: float(r[k]) for k in keys} for r in run.read_metrics()]  # type: ignore[arg-type]
    return StepResult(job.arm, rows)


def run_in_subprocess(job: Job, contention: dict[str, float]) -> HandoffResult | StepResult:
    data = run_worker(__file__, asdict(job), f"{job.kind} {job.arm}", contention)
    return HandoffResult(**data) if job.kind == "handoff" else StepResult(**data)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ driver


def full_every() -> int:
    from rlora.config import RLConfig

    return RLConfig().fingerprint_full_every


def format_table(handoffs: dict[str, HandoffResult], steps: dict[str, StepResult]) -> str:
    """One row per arm: the handoff, its verification (probe + fingerprints; FullFT whole and sampled
    read-backs apart) and the step, all from one run. verify / step is amortized over the default
    cycle: a whole read-back every `fingerprint_full_every` versions, a sample otherwise."""
    rows = [
        "| arm | payload MB | handoff s | verify s whole | verify s sampled | probe s | tensors checked | probe gap "
        "| step s | handoff s in run | verify s in run (amortized) | handoff / step | verify / step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, h in handoffs.items():
        s = steps.get(arm)
        step_cols = (
            f"{s.timed('step_s'):.1f} | {s.timed('handoff_s'):.3f} | {s.verify_amortized(full_every()):.3f} "
            f"| {s.timed('handoff_s') / s.timed('step_s'):.2%} | {s.verify_amortized(full_every()) / s.timed('step_s'):.2%}"
            if s
            else "| | | |"
        )
        rows.append(
            f"| {arm} | {h.payload_mb:.2f} | {statistics.median(h.handoff_s):.3f} | {h.verify(whole=True):.3f} | {h.verify(whole=False):.3f} "
            f"| {statistics.median(h.probe_s):.3f} | {h.fingerprint_tensors:.0f} "
            f"| {statistics.median(h.probe_gap):.2g} | {step_cols} |"
        )
    return "\n".join(rows)


def step_breakdown(steps: dict[str, StepResult]) -> str:
    rows = [
        "| arm | step | step s | sample s | grade s | learn s | handoff s | verify s | probe s | fingerprint s | read-back share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, s in steps.items():
        for i, r in enumerate(s.rows):
            rows.append(
                f"| {arm} | {i} | {r['step_s']:.2f} | {r['sample_s']:.2f} | {r['grade_s']:.3f} | {r['learn_s']:.2f} "
                f"| {r['handoff_s']:.3f} | {r['verify_s']:.3f} | {r['probe_s']:.3f} | {r['fingerprint_s']:.3f} | {r['fingerprint_fraction']:.3g} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: two versions, one tiny step")
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    parser.add_argument("--reps", type=int, default=5, help="timed handoffs per arm after one warm-up")
    parser.add_argument("--steps", type=int, default=3, help="max_steps of the real run per arm")
    parser.add_argument("--no-steps", action="store_true", help="skip the real RL runs")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="engine and learner precision")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        job = Job(**json.loads(args.worker))
        result = run_handoff(job) if job.kind == "handoff" else run_step(job)
        emit_result(asdict(result))
        return

    reps, n_steps = (1, 2) if args.quick else (args.reps, args.steps)
    fast_lora = os.environ.get("RLORA_FAST_LORA", "1 (default)")
    print(
        f"arms {', '.join(args.arms)}; dtype {args.dtype}; {reps} handoffs after a warm-up; real runs of {n_steps} steps; RLORA_FAST_LORA={fast_lora}",
        flush=True,
    )
    handoffs: dict[str, HandoffResult] = {}
    steps: dict[str, StepResult] = {}
    contention: dict[str, float] = {}
    for arm in args.arms:
        h = run_in_subprocess(Job("handoff", arm, reps, args.quick, args.dtype), contention)
        assert isinstance(h, HandoffResult)
        handoffs[arm] = h
        print(
            f"  {arm}: handoff {statistics.median(h.handoff_s):.3f} s (max {max(h.handoff_s):.3f}), verify whole {h.verify(whole=True):.3f} s, "
            f"sampled {h.verify(whole=False):.3f} s (probe {statistics.median(h.probe_s):.3f})",
            flush=True,
        )
        if not args.no_steps:
            s = run_in_subprocess(Job("step", arm, n_steps, args.quick, args.dtype), contention)
            assert isinstance(s, StepResult)
            steps[arm] = s
            print(
                f"  {arm}: step {s.timed('step_s'):.1f} s, handoff in run {s.timed('handoff_s'):.3f} s, verify {s.verify_amortized(full_every()):.3f} s",
                flush=True,
            )
    print(format_table(handoffs, steps))
    if steps:
        print(step_breakdown(steps))
    verdicts = {}
    for arm, h in handoffs.items():
        seconds = statistics.median(h.handoff_s)
        share = steps[arm].timed("handoff_s") / steps[arm].timed("step_s") if arm in steps else float("nan")
        verify_share = steps[arm].verify_amortized(full_every()) / steps[arm].timed("step_s") if arm in steps else float("nan")
        ok = seconds < TARGET_SECONDS and (arm not in steps or (share < TARGET_SHARE and verify_share < TARGET_SHARE))
        verdicts[arm] = {"handoff_s": seconds, "share": share, "verify_share": verify_share, "pass": ok}
        print(
            f"{arm}: handoff {seconds:.3f} s (< {TARGET_SECONDS} s), share {share:.2%} (< {TARGET_SHARE:.0%}), "
            f"verification share {verify_share:.2%} (< {TARGET_SHARE:.0%}): {'PASS' if ok else 'FAIL'}"
        )
    if args.out:
        payload = {
            "fast_lora_env": fast_lora,
            "handoff": {arm: asdict(h) for arm, h in handoffs.items()},
            "steps": {arm: asdict(s) for arm, s in steps.items()},
            "verdicts": verdicts,
            "foreign_cpu_share": contention,
        }
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
