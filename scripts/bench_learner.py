"""Learner speed and memory: rank-1 LoRA against FullFT on the same TrainBatch.

The batch is an RL step's: 8 synthetic groups x 8 rollouts of a chat-templated arithmetic prompt
(45 tokens, `rlora.data.make_prompt`) plus 64 random completion tokens (109 tokens a row, 64 rows),
rewards alternating 0/1 so every group has signal, built by `rlora.rl.batching.build_batch` with
centred advantages. Each step is `Learner.train_step` with the demo loss (truncated IS, cap 2,
token-mean), micro-batch 16: forward, backward and one AdamW step.

Each arm (rank-1 or FullFT at one precision) runs in its own process, so peak memory is its own:
  rss_imports   RSS once torch, transformers and rlora are imported (no model)
  rss_loaded    RSS once the Learner (model + optimizer) is built and every weight has been read
                (checkpoint pages mapped from the file count only once touched)
  peak          resource.getrusage ru_maxrss at the end: the process's peak RSS. Before the
                warm-up the kernel's high-water mark is reset (/proc/self/clear_refs, 5) when
                allowed, so the peak is that of training, not of loading the float32 checkpoint;
                the table says whether the reset took effect.
  increase      peak - rss_loaded: gradients, optimizer state and activations
  learner mem   peak - rss_imports: everything the learner needs beyond the interpreter
Speed: one warm-up step, then the median of `--steps` timed steps; tokens/s counts every token
of every row (prompt + completion), as the forward pass does; loss tokens are the completions.

Run it under the machine's heavy-job lock (FullFT float32 is slow: split by precision):
    flock /tmp/rlora-heavy.lock .venv/bin/python scripts/bench_learner.py --dtypes bfloat16 --out learner_bf16.json
    flock /tmp/rlora-heavy.lock .venv/bin/python scripts/bench_learner.py --dtypes float32 --out learner_fp32.json
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchlib import emit_result, run_worker

TARGET_TIME = 0.5
TARGET_MEMORY = 0.4


@dataclass(frozen=True)
class Job:
    arm: str
    """"r1" or "full"."""
    dtype: str
    """Learner compute precision: bfloat16 (autocast over float32 masters) or float32."""
    prompts: int
    group_size: int
    completion_tokens: int
    steps: int
    """Timed steps after one warm-up step."""
    micro_batch: int


@dataclass(frozen=True)
class Result:
    arm: str
    dtype: str
    rows: int
    tokens: int
    """All tokens of the batch (prompt + completion, unpadded)."""
    loss_tokens: int
    step_s: list[float]
    warmup_s: float
    trainable: int
    rss_imports_mb: float
    rss_loaded_mb: float
    peak_mb: float
    peak_reset: bool
    """True when the high-water mark was reset after loading (peak is training's own)."""

    @property
    def tok_s(self) -> float:
        return self.tokens / statistics.median(self.step_s)


# ------------------------------------------------------------------------------------ worker


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (which ru_maxrss reports); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 <= rss_mb() + 1


def synthetic_batch(job: Job, tokenizer: object) -> object:
    """P groups x G rollouts: real prompts, random completions, rewards alternating 0/1."""
    import torch

    from rlora.data import arith_problems, make_prompt
    from rlora.rl.advantages import ADVANTAGES
    from rlora.rl.batching import build_batch
    from rlora.rl.types import Group, Rollout

    generator = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)  # type: ignore[arg-type]
    groups = []
    for problem in arith_problems(job.prompts, 9, seed=0):
        prompt = make_prompt(problem, tokenizer)
        rollouts = []
        for g in range(job.group_size):
            ids_T = torch.randint(100, vocab, (job.completion_tokens,), generator=generator)
            lps_T = -torch.rand(job.completion_tokens, generator=generator) * 3  # plausible sampler logprobs
            rollouts.append(
                Rollout(
                    prompt_ids=prompt.prompt_ids,
                    completion_ids=tuple(ids_T.tolist()),
                    sampler_logprobs=tuple(lps_T.tolist()),
                    reward=float(g % 2),
                    text="",
                    finish_reason="stop",
                )
            )
        groups.append(Group(prompt=prompt, rollouts=tuple(rollouts), policy_version=0))
    pad_id = tokenizer.pad_token_id or 0  # type: ignore[attr-defined]
    batch = build_batch(groups, ADVANTAGES["center"], pad_id=pad_id)
    assert batch is not None, "every synthetic group has mixed rewards"
    return batch


def run_arm(job: Job) -> Result:
    import torch  # noqa: F401  (counted in rss_imports)
    import transformers  # noqa: F401
    from transformers import AutoTokenizer

    from rlora.rl.losses import NORMALIZERS, LossSpec
    from rlora.train import lora
    from rlora.train.learner import Learner, LearnerSpec
    from rlora.train.models import resolve_model

    model_path = resolve_model("default")
    batch = synthetic_batch(job, AutoTokenizer.from_pretrained(model_path))
    gc.collect()
    rss_imports = rss_mb()

    spec = lora.LoRASpec(rank=1) if job.arm == "r1" else None
    learner = Learner(LearnerSpec(model_path=model_path, lora=spec, lr=1e-4, dtype=job.dtype, micro_batch=job.micro_batch))
    with torch.no_grad():  # weights may still be lazily mapped from the checkpoint: make them resident
        for p in learner.model.parameters():
            p.sum()
    gc.collect()
    rss_loaded = rss_mb()
    peak_reset = reset_peak_rss()

    loss, norm = LossSpec(loss="tis", cap=2.0, temperature=1.0), NORMALIZERS["tokens"](batch.num_tokens, 0.0)  # type: ignore[attr-defined]

    def step() -> float:
        start = time.perf_counter()
        learner.train_step(batch, loss, norm)  # type: ignore[arg-type]
        return time.perf_counter() - start

    warmup_s = step()
    step_s = [step() for _ in range(job.steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return Result(
        arm=job.arm,
        dtype=job.dtype,
        rows=int(batch.tokens_B_T.shape[0]),  # type: ignore[attr-defined]
        tokens=int(batch.lengths_B.sum()),  # type: ignore[attr-defined]
        loss_tokens=batch.num_tokens,  # type: ignore[attr-defined]
        step_s=step_s,
        warmup_s=warmup_s,
        trainable=sum(p.numel() for p in learner.trainable),
        rss_imports_mb=rss_imports,
        rss_loaded_mb=rss_loaded,
        peak_mb=peak,
        peak_reset=peak_reset,
    )


def run_in_subprocess(job: Job, contention: dict[str, float]) -> Result:
    return Result(**run_worker(__file__, asdict(job), f"{job.arm} {job.dtype}", contention))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ driver


def format_table(results: list[Result]) -> str:
    rows = [
        "| arm | dtype | trainable | step s | tok/s | rss imports MB | rss loaded MB | peak MB | increase MB | learner mem MB | peak reset |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        rows.append(
            f"| {r.arm} | {r.dtype} | {r.trainable:,} | {statistics.median(r.step_s):.2f} | {r.tok_s:,.0f} | {r.rss_imports_mb:,.0f} "
            f"| {r.rss_loaded_mb:,.0f} | {r.peak_mb:,.0f} | {r.peak_mb - r.rss_loaded_mb:,.0f} | {r.peak_mb - r.rss_imports_mb:,.0f} "
            f"| {'yes' if r.peak_reset else 'no'} |"
        )
    return "\n".join(rows)


def ratios(lora: Result, full: Result) -> dict[str, float]:
    """rank-1 / FullFT for time and each memory figure (lower is better for rank-1)."""
    return {
        "time": statistics.median(lora.step_s) / statistics.median(full.step_s),
        "peak": lora.peak_mb / full.peak_mb,
        "increase": (lora.peak_mb - lora.rss_loaded_mb) / (full.peak_mb - full.rss_loaded_mb),
        "learner_mem": (lora.peak_mb - lora.rss_imports_mb) / (full.peak_mb - full.rss_imports_mb),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: 2 x 2 rows of 8 completion tokens, one step")
    parser.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = run_arm(Job(**json.loads(args.worker)))
        emit_result(asdict(result))
        return

    shape = (2, 2, 8, 1) if args.quick else (8, 8, 64, args.steps)
    print(f"batch: {shape[0]} groups x {shape[1]} rollouts, prompt 45 + {shape[2]} completion tokens; micro-batch {args.micro_batch}", flush=True)
    results: list[Result] = []
    summary = {}
    contention: dict[str, float] = {}
    for dtype in args.dtypes:
        by_arm = {}
        for arm in ("r1", "full"):
            r = run_in_subprocess(Job(arm, dtype, *shape[:3], shape[3], args.micro_batch), contention)
            by_arm[arm] = r
            results.append(r)
            print(f"  {arm} {dtype}: {statistics.median(r.step_s):.2f} s/step, {r.tok_s:,.0f} tok/s, peak {r.peak_mb:,.0f} MB", flush=True)
        q = ratios(by_arm["r1"], by_arm["full"])
        ok_time, ok_mem = q["time"] <= TARGET_TIME, q["peak"] <= TARGET_MEMORY
        summary[dtype] = q | {"pass_time": ok_time, "pass_memory_peak": ok_mem}
        print(
            f"{dtype}: rank-1 / FullFT time {q['time']:.2f}x (target <= {TARGET_TIME}): {'PASS' if ok_time else 'FAIL'}; "
            f"peak RSS {q['peak']:.2f}x (target <= {TARGET_MEMORY}): {'PASS' if ok_mem else 'FAIL'}; "
            f"increase over loaded {q['increase']:.2f}x; learner memory {q['learner_mem']:.2f}x",
            flush=True,
        )
    print(format_table(results))
    if args.out:
        payload = {"results": [asdict(r) | {"tok_s": r.tok_s} for r in results], "ratios": summary, "foreign_cpu_share": contention}
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
