"""A whole RL step, ours against TRL's GRPOTrainer on the same work, FullFT and rank-1 LoRA.

The work per optimizer step: 8 arithmetic prompts x 8 samples, up to 64 new tokens (both stop at
EOS), the default model (SmolLM2-135M-Instruct), CPU, reward `rewards.grade(completion, gold,
"number")`, one AdamW step over all 64 completions in micro-batches of 16, no KL reference.

  ours   `rlora.rl.loop.run_rl` with the demo preset (`configs/rl_cpu_demo_full.yaml` or
         `rl_cpu_demo_lora_r1.yaml`), no checkpoints; step_s from metrics.jsonl, median over the
         steps after step 0 (step 0 carries first-call warm-up). Sampling is our in-process vLLM
         engine (bf16); the learner keeps float32 masters under bf16 autocast (a bf16 frozen base
         for LoRA).
  trl    `trl.GRPOTrainer` with TRL's own transformers generation (`use_vllm=False`: vLLM is not
         used on the TRL side), num_generations=8, max_completion_length=64,
         per_device_train_batch_size=16 x gradient_accumulation_steps=4 (so generation_batch_size
         = 64 = 8 prompts x 8, one generation per optimizer step), beta=0 (no reference model),
         gradient checkpointing off (TRL's default is on; off is faster and matches ours),
         bf16=True (autocast) when it works on CPU, else float32, logging and saving off,
         report_to none, HF_HUB_OFFLINE=1. Weights as ours keeps them: float32 for FullFT; for
         LoRA a bf16 base with PEFT's float32 adapter (LoraConfig r=1, alpha=32, all seven
         projections, no dropout). Learning rates are the presets'. A TrainerCallback records
         the wall time between consecutive step ends; the first step is the warm-up.
Each side runs in its own process, one at a time; the ratio is TRL s/step over ours, same run.

Run it under the machine's heavy-job lock, one arm per command (a TRL step takes over a minute):
    flock /tmp/rlora-heavy.lock .venv/bin/python scripts/bench_trl.py --arms full --out trl_full.json
    flock /tmp/rlora-heavy.lock .venv/bin/python scripts/bench_trl.py --arms lora --out trl_lora.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchlib import REPO, emit_result, run_worker

PRESETS = {"full": REPO / "configs" / "rl_cpu_demo_full.yaml", "lora": REPO / "configs" / "rl_cpu_demo_lora_r1.yaml"}
TARGET_SPEEDUP = 3.0


@dataclass(frozen=True)
class Job:
    side: str
    """"ours" or "trl"."""
    arm: str
    """"full" or "lora" (rank 1)."""
    steps: int
    """Optimizer steps in all, the first being the warm-up."""
    prompts: int
    group_size: int
    max_tokens: int
    micro_batch: int


@dataclass(frozen=True)
class Result:
    side: str
    arm: str
    step_s: list[float]
    """Every step's wall time, the warm-up step first."""
    mean_completion_tokens: list[float]
    """Mean completion length per step (where the side reports it)."""
    precision: str
    """What actually ran."""
    breakdown: list[dict[str, float]]
    """Per step: ours sample_s, grade_s, learn_s, handoff_s, verify_s; TRL generate_s, train_s."""

    @property
    def timed_s(self) -> float:
        return statistics.median(self.step_s[1:] or self.step_s)


# ------------------------------------------------------------------------------------ workers


def run_ours(job: Job) -> Result:
    from rlora.config import RLConfig, load_config
    from rlora.rl.loop import run_rl

    with tempfile.TemporaryDirectory(prefix="rlora-bench-trl-") as tmp:
        overrides = [
            f"max_steps={job.steps}",
            "checkpoint_every=0",
            f"run_dir={tmp}/run",
            f"prompts_per_step={job.prompts}",
            f"group_size={job.group_size}",
            f"max_tokens={job.max_tokens}",
            f"micro_batch={job.micro_batch}",
        ]
        cfg = load_config(RLConfig, PRESETS[job.arm], overrides)
        rows = run_rl(cfg, progress=False).read_metrics()
    n = job.prompts * job.group_size
    keys = ("sample_s", "grade_s", "learn_s", "handoff_s", "verify_s")
    return Result(
        "ours",
        job.arm,
        [float(r["step_s"]) for r in rows],
        [float(r["tokens"]) / n for r in rows],  # type: ignore[arg-type]
        f"vLLM {cfg.dtype}; learner float32 masters, {cfg.dtype} autocast",
        [{k: float(r[k]) for k in keys} for r in rows],  # type: ignore[arg-type]
    )


def run_trl(job: Job) -> Result:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import rewards
    from rlora.config import RLConfig, load_config
    from rlora.data import arith_problems
    from rlora.train.models import resolve_model

    cfg = load_config(RLConfig, PRESETS[job.arm])
    model_path = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    problems = arith_problems(job.prompts * job.steps * 4, cfg.arith_max, cfg.seed)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p.question}], "gold": p.reference} for p in problems])

    lengths: list[float] = []  # mean completion length of each generation batch
    generated_at: list[float] = []  # when each generation batch reached the reward

    def arith_reward(completions: list[object], gold: list[str], completion_ids: list[list[int]], **kwargs: object) -> list[float]:
        generated_at.append(time.perf_counter())
        lengths.append(sum(len(ids) for ids in completion_ids) / len(completion_ids))
        texts = [c[0]["content"] if isinstance(c, list) else str(c) for c in completions]  # conversational: [message]
        return [rewards.grade(t, g, "number") for t, g in zip(texts, gold)]

    class StepTimer(TrainerCallback):
        """Step ends (the first mark is the start of training) and step begins, which precede generation."""

        def __init__(self) -> None:
            self.marks: list[float] = []
            self.begins: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.marks.append(time.perf_counter())

        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.marks.append(time.perf_counter())

    peft_config = None
    if job.arm == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=1,
            lora_alpha=32,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
    weights_dtype = "bfloat16" if job.arm == "lora" else "float32"  # as our learner keeps them
    total = job.prompts * job.group_size
    per_device = min(job.micro_batch, total)
    assert total % per_device == 0, f"{total} completions do not split into micro-batches of {per_device}"

    def make_trainer(bf16: bool, out_dir: str) -> tuple[GRPOTrainer, StepTimer]:
        args = GRPOConfig(
            output_dir=out_dir,
            use_cpu=True,
            seed=cfg.seed,
            max_steps=job.steps,
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=total // per_device,
            num_generations=job.group_size,
            max_completion_length=job.max_tokens,
            temperature=cfg.temperature,
            top_p=1.0,
            top_k=0,
            beta=0.0,
            use_vllm=False,
            learning_rate=cfg.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.grad_clip,
            bf16=bf16,
            gradient_checkpointing=False,
            model_init_kwargs={"dtype": getattr(torch, weights_dtype)},
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        timer = StepTimer()
        trainer = GRPOTrainer(
            model=model_path,
            reward_funcs=arith_reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[timer],
        )
        return trainer, timer

    with tempfile.TemporaryDirectory(prefix="rlora-bench-trl-") as tmp:
        try:
            trainer, timer = make_trainer(True, tmp)
            trainer.train()
            precision = f"weights {weights_dtype}, bf16=True (autocast in the loss)"
        except (ValueError, RuntimeError, NotImplementedError) as e:  # bf16 refused on this CPU stack
            print(f"bf16 failed on CPU ({type(e).__name__}: {e}); falling back to float32", file=sys.stderr, flush=True)
            trainer, timer = make_trainer(False, tmp)
            trainer.train()
            precision = f"weights {weights_dtype}, float32 compute (bf16=True failed: {type(e).__name__})"
    step_s = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    assert len(step_s) == job.steps, f"timed {len(step_s)} steps, expected {job.steps}"
    # generate_s: step begin to the reward call (prompt tokenization + HF generate + decode);
    # train_s: the rest (reward, advantages, forward/backward of every micro-batch, optimizer step).
    gen_at = generated_at[-job.steps :]
    breakdown = [{"generate_s": g - b, "train_s": e - g} for b, g, e in zip(timer.begins, gen_at, timer.marks[1:])]
    return Result("trl", job.arm, step_s, lengths[-job.steps :], precision, breakdown)


WORKERS = {"ours": run_ours, "trl": run_trl}


def run_in_subprocess(job: Job, contention: dict[str, float]) -> Result:
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return Result(**run_worker(__file__, asdict(job), f"{job.side} {job.arm}", contention, offline))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ driver


def format_table(results: list[Result]) -> str:
    rows = [
        "| arm | side | precision | steps (s) | s/step (after warm-up) | mean completion tokens | TRL / ours |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    trl = {r.arm: r for r in results if r.side == "trl"}
    for r in results:
        ratio = f"{trl[r.arm].timed_s / r.timed_s:.1f}x" if r.side == "ours" and r.arm in trl else ""
        lengths = f"{statistics.mean(r.mean_completion_tokens):.1f}" if r.mean_completion_tokens else "n/a"
        rows.append(f"| {r.arm} | {r.side} | {r.precision} | {', '.join(f'{s:.1f}' for s in r.step_s)} | {r.timed_s:.1f} | {lengths} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: 2 prompts x 2 samples x 8 tokens, 2 steps")
    parser.add_argument("--arms", nargs="*", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--ours-steps", type=int, default=4, help="our steps in all (step 0 is the warm-up)")
    parser.add_argument("--trl-steps", type=int, default=3, help="TRL optimizer steps in all (the first is the warm-up)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        job = Job(**json.loads(args.worker))
        emit_result(asdict(WORKERS[job.side](job)))
        return

    work, ours_steps, trl_steps = ((2, 2, 8, 2), 2, 2) if args.quick else ((8, 8, 64, 16), args.ours_steps, args.trl_steps)
    fast_lora = os.environ.get("RLORA_FAST_LORA", "1 (default)")
    print(f"work per step: {work[0]} prompts x {work[1]} samples x <= {work[2]} tokens, micro-batch {work[3]}; RLORA_FAST_LORA={fast_lora}", flush=True)
    results: list[Result] = []
    verdicts = {}
    contention: dict[str, float] = {}
    for arm in args.arms:
        ours = run_in_subprocess(Job("ours", arm, ours_steps, *work), contention)
        print(f"  {arm} ours: {', '.join(f'{s:.1f}' for s in ours.step_s)} s", flush=True)
        trl = run_in_subprocess(Job("trl", arm, trl_steps, *work), contention)
        print(f"  {arm} trl ({trl.precision}): {', '.join(f'{s:.1f}' for s in trl.step_s)} s", flush=True)
        results += [ours, trl]
        speedup = trl.timed_s / ours.timed_s
        verdicts[arm] = {"ours_s": ours.timed_s, "trl_s": trl.timed_s, "speedup": speedup, "pass": speedup >= TARGET_SPEEDUP}
    print(format_table(results))
    for r in results:
        if r.breakdown:
            rows = r.breakdown[1:] or r.breakdown
            parts = ", ".join(f"{k} {statistics.median(b[k] for b in rows):.2f}" for k in rows[0])
            print(f"{r.side} {r.arm}, median after the warm-up step: step {r.timed_s:.2f} s; {parts}")
    for arm, v in verdicts.items():
        print(
            f"{arm}: TRL {v['trl_s']:.1f} s/step, ours {v['ours_s']:.1f} s/step: {v['speedup']:.1f}x (target >= {TARGET_SPEEDUP:g}x): {'PASS' if v['pass'] else 'FAIL'}"
        )
    if args.out:
        payload = {
            "fast_lora_env": fast_lora,
            "results": [asdict(r) | {"timed_s": r.timed_s} for r in results],
            "verdicts": verdicts,
            "foreign_cpu_share": contention,
        }
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
