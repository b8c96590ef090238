"""Sampler throughput: our vLLM `Sampler` against transformers `generate`, base model and rank-1 LoRA.

The work is what an RL step samples: chat-templated arithmetic prompts (`rlora.data.arith_problems`
through `rlora.data.make_prompt`, 45 tokens each), G samples per prompt, T new tokens per sample,
temperature 1, top-p 1, no top-k. Lengths are fixed on both sides so token counts are equal:
`ignore_eos=True` for vLLM, `min_new_tokens = max_new_tokens` for transformers.

Sides, each in its own process (one at a time):
  hf     transformers `generate(do_sample=True, num_return_sequences=G)`, model in bf16, all P
         prompts left-padded into one batch; the adapter is applied with PEFT (`PeftModel`).
  vllm   `rlora.engine.sampler.Sampler` (in-process CPU engine, bf16, eager, block 32), the adapter handed
         over with `Sampler.load_adapter` exactly as the RL loop does. The fixed-length call is the
         request `Sampler.sample` makes (n=G, logprobs=0, the live adapter) plus `ignore_eos`; the
         plain `Sampler.sample` (stops at EOS, as in a run) is timed too and reported apart.
  ceiling  no engine: one decode step's matrix products alone, every linear layer of the model
         (lm_head included) as a bf16 GEMM over P x G rows, timed with torch. Attention, sampling
         and scheduling are left out, so no engine can decode faster than this on the machine:
         ceiling / HF is the largest vLLM / HF ratio this CPU allows at that batch.
Adapters: base model (none) and one rank-1 adapter on all seven projections with non-zero B,
written once in PEFT layout by `rlora.train.lora` and loaded by both sides.

Each measurement: one warm-up call, then `--reps` calls on fresh prompts with the prefix cache
reset (a new policy version starts with a cold cache); the median is reported. Ratios compare
vLLM with transformers on the same workload in the same run.

Run it under the machine's heavy-job lock:
    flock /tmp/rlora-heavy.lock .venv/bin/python scripts/bench_sampler.py --out bench_sampler.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchlib import emit_result, run_worker

TARGET_RATIO = 20.0
ARITH_MAX = 9


@dataclass(frozen=True)
class Workload:
    prompts: int
    """P distinct prompts per call."""
    samples: int
    """G samples per prompt."""
    new_tokens: int
    """T tokens generated per sample (fixed)."""

    @property
    def label(self) -> str:
        return f"{self.prompts}x{self.samples}x{self.new_tokens}"

    @property
    def tokens(self) -> int:
        return self.prompts * self.samples * self.new_tokens


@dataclass(frozen=True)
class Job:
    side: str
    """"hf" (transformers generate) or "vllm" (rlora.engine.sampler.Sampler)."""
    adapter_dir: str
    """PEFT adapter served during the measurement; "" for the base model."""
    workloads: tuple[Workload, ...]
    reps: int
    """Timed calls per workload after one warm-up call."""
    natural: bool
    """vLLM only: also time plain `Sampler.sample` (stops at EOS) on the first workload."""


@dataclass(frozen=True)
class Timing:
    side: str
    adapter: str
    """"base" or "rank-1"."""
    workload: str
    """P x G x T, or "P x G x <=T (EOS)" for the natural-length row."""
    tokens: float
    """Generated tokens per call (the median call for the natural-length row; one decode step, P x G, for the ceiling)."""
    seconds: list[float]
    """Wall time of each timed call."""

    @property
    def tok_s(self) -> float:
        return self.tokens / statistics.median(self.seconds)


# ------------------------------------------------------------------------------------ workers


def arith_prompt_batches(tokenizer: object, workload: Workload, calls: int) -> list[list[object]]:
    """`calls` disjoint lists of P chat-templated arithmetic prompts (`rlora.rl.types.Prompt`)."""
    from rlora.data import arith_problems, make_prompt

    problems = arith_problems(workload.prompts * calls, ARITH_MAX, seed=1234)
    prompts = [make_prompt(p, tokenizer) for p in problems]
    return [prompts[i * workload.prompts : (i + 1) * workload.prompts] for i in range(calls)]


def run_vllm(job: Job) -> list[Timing]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from rlora.engine.sampler import EngineSpec, Sampler
    from rlora.train.models import resolve_model

    model_path = resolve_model("default")
    largest = max(w.prompts * w.samples for w in job.workloads)
    sampler = Sampler(
        EngineSpec(model_path=model_path, device="cpu", dtype="bfloat16", lora_rank=1 if job.adapter_dir else None, max_num_seqs=max(256, largest))
    )
    if job.adapter_dir:
        sampler.load_adapter(lambda path: shutil.copytree(job.adapter_dir, path), version=0)
    adapter = "rank-1" if job.adapter_dir else "base"

    def fixed_length(prompts: list[object], w: Workload) -> float:
        # The request Sampler.sample makes, plus ignore_eos so every sample has exactly T tokens.
        params = SamplingParams(n=w.samples, temperature=1.0, top_p=1.0, max_tokens=w.new_tokens, logprobs=0, ignore_eos=True)
        requests = [TokensPrompt(prompt_token_ids=list(p.prompt_ids)) for p in prompts]  # type: ignore[attr-defined]
        sampler.llm.reset_prefix_cache()
        start = time.perf_counter()
        outputs = sampler.llm.generate(requests, params, lora_request=sampler._lora, use_tqdm=False)  # the live adapter
        seconds = time.perf_counter() - start
        made = sum(len(c.token_ids) for out in outputs for c in out.outputs)
        assert made == w.tokens, f"vLLM generated {made} tokens, expected {w.tokens}"
        assert all(c.logprobs is not None for out in outputs for c in out.outputs), "no per-token logprobs"
        return seconds

    timings = []
    for w in job.workloads:
        batches = arith_prompt_batches(sampler.tokenizer, w, job.reps + 1)
        fixed_length(batches[0], w)  # warm-up
        timings.append(Timing("vllm", adapter, w.label, w.tokens, [fixed_length(b, w) for b in batches[1:]]))
    if job.natural:
        w = job.workloads[0]
        batches = arith_prompt_batches(sampler.tokenizer, w, job.reps)
        seconds, tokens = [], []
        for prompts in batches:
            sampler.llm.reset_prefix_cache()
            start = time.perf_counter()
            groups = sampler.sample(prompts, w.samples, w.new_tokens, temperature=1.0)  # type: ignore[arg-type]
            seconds.append(time.perf_counter() - start)
            tokens.append(sum(len(s.completion_ids) for g in groups for s in g))
        timings.append(Timing("vllm", adapter, f"{w.prompts}x{w.samples}x<={w.new_tokens} (EOS)", statistics.median(tokens), seconds))
    sampler.close()
    return timings


def run_hf(job: Job) -> list[Timing]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlora.train.models import resolve_model

    model_path = resolve_model("default")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    if job.adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, job.adapter_dir)
    model.eval()
    adapter = "rank-1" if job.adapter_dir else "base"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(prompts: list[object], w: Workload) -> float:
        ids = [list(p.prompt_ids) for p in prompts]  # type: ignore[attr-defined]
        width = max(len(x) for x in ids)
        input_ids_P_L = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids])  # left-padded
        attention_P_L = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        start = time.perf_counter()
        with torch.no_grad():
            out_N_S = model.generate(
                input_ids=input_ids_P_L,
                attention_mask=attention_P_L,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                num_return_sequences=w.samples,
                max_new_tokens=w.new_tokens,
                min_new_tokens=w.new_tokens,
                pad_token_id=pad_id,
            )
        seconds = time.perf_counter() - start
        assert out_N_S.shape == (w.prompts * w.samples, width + w.new_tokens), f"unexpected output shape {tuple(out_N_S.shape)}"
        return seconds

    timings = []
    for w in job.workloads:
        batches = arith_prompt_batches(tokenizer, w, job.reps + 1)
        generate(batches[0], w)  # warm-up
        timings.append(Timing("hf", adapter, w.label, w.tokens, [generate(b, w) for b in batches[1:]]))
    return timings


def run_ceiling(job: Job) -> list[Timing]:
    """Tokens/s if a decode step cost only its matrix products (see the module docstring)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from rlora.train.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("default"), dtype=torch.bfloat16)
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]
    timings = []
    for w in job.workloads:
        rows = w.prompts * w.samples  # sequences decoding together: one new token each per step
        x = {d_in: torch.randn(rows, d_in, dtype=torch.bfloat16) for d_in in {wt.shape[1] for wt in weights}}

        def one_step(x: dict[int, torch.Tensor] = x) -> float:
            start = time.perf_counter()
            with torch.no_grad():
                for wt in weights:
                    torch.nn.functional.linear(x[wt.shape[1]], wt)
            return time.perf_counter() - start

        one_step()  # warm-up
        timings.append(Timing("ceiling", "base", w.label, rows, [one_step() for _ in range(max(5, job.reps))]))
    return timings


WORKERS = {"hf": run_hf, "vllm": run_vllm, "ceiling": run_ceiling}


def run_in_subprocess(job: Job, contention: dict[str, float]) -> list[Timing]:
    label = f"{job.side} {'rank-1' if job.adapter_dir else 'base'}"
    return [Timing(**t) for t in run_worker(__file__, asdict(job), label, contention)]  # type: ignore[union-attr]


def job_from_json(text: str) -> Job:
    data = json.loads(text)
    data["workloads"] = tuple(Workload(**w) for w in data["workloads"])
    return Job(**data)


# ------------------------------------------------------------------------------------ driver


def write_rank1_adapter(out_dir: Path) -> None:
    """A rank-1 adapter on all seven projections, B non-zero so it really changes the outputs."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlora.train import lora
    from rlora.train.models import resolve_model

    model_path = resolve_model("default")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    spec = lora.LoRASpec(rank=1)
    generator = torch.Generator().manual_seed(0)
    lora.apply_lora(model, spec, generator=generator)
    with torch.no_grad():
        for b in lora.lora_parameters(model)[1]:
            b.normal_(0.0, 1e-3, generator=generator)
    lora.save_peft_adapter(model, spec, out_dir, base_model=model_path)


def format_table(timings: list[Timing]) -> str:
    hf = {(t.adapter, t.workload): t for t in timings if t.side == "hf"}
    header = "| side | adapter | P x G x T | tokens/call | median s | tok/s | / HF |"
    rows = [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    for t in timings:
        ref = hf.get((t.adapter, t.workload)) if t.side != "hf" else None
        ratio = f"{t.tok_s / ref.tok_s:.1f}x" if ref else ""
        rows.append(f"| {t.side} | {t.adapter} | {t.workload} | {t.tokens:,.0f} | {statistics.median(t.seconds):.2f} | {t.tok_s:,.0f} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds): 2x2x8, one rep")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per vLLM measurement")
    parser.add_argument("--hf-reps", type=int, default=2, help="timed calls per transformers measurement")
    parser.add_argument("--adapters", nargs="*", default=["base", "rank-1"], choices=["base", "rank-1"])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # child process: one side, one adapter
        job = job_from_json(args.worker)
        timings = WORKERS[job.side](job)
        emit_result([asdict(t) for t in timings])
        return

    if args.quick:
        same, larger, reps, hf_reps = Workload(2, 2, 8), Workload(4, 2, 8), 1, 1
    else:
        same, larger, reps, hf_reps = Workload(8, 8, 64), Workload(32, 8, 64), args.reps, args.hf_reps
    fast_lora = os.environ.get("RLORA_FAST_LORA", "1 (default)")
    print(f"workloads: {same.label} (both sides), {larger.label} (vLLM only); bf16; RLORA_FAST_LORA={fast_lora}", flush=True)
    timings: list[Timing] = []
    contention: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="rlora-bench-sampler-") as tmp:
        adapter_dir = Path(tmp) / "rank1"
        write_rank1_adapter(adapter_dir)
        for adapter in args.adapters:
            path = str(adapter_dir) if adapter == "rank-1" else ""
            for job in (Job("hf", path, (same,), hf_reps, False), Job("vllm", path, (same, larger), reps, True)):
                for t in run_in_subprocess(job, contention):
                    timings.append(t)
                    print(f"  {t.side} {t.adapter} {t.workload}: {t.tok_s:,.0f} tok/s (calls {', '.join(f'{s:.2f}' for s in t.seconds)} s)", flush=True)
        for t in run_in_subprocess(Job("ceiling", "", (same, larger), reps, False), contention):
            timings.append(t)
            print(f"  ceiling {t.workload}: {t.tok_s:,.0f} tok/s (matrix products alone)", flush=True)
    print(format_table(timings))
    on_same = {(t.side, t.adapter): t for t in timings if t.workload == same.label}
    verdicts = []
    for adapter in args.adapters:
        ratio = on_same["vllm", adapter].tok_s / on_same["hf", adapter].tok_s
        verdicts.append({"adapter": adapter, "ratio": ratio, "pass": ratio >= TARGET_RATIO})
        print(f"{adapter}: vLLM / HF on {same.label} = {ratio:.1f}x (target >= {TARGET_RATIO:g}x): {'PASS' if ratio >= TARGET_RATIO else 'FAIL'}")
    if "base" in args.adapters:  # the ceiling is the base model's
        ceiling, hf_base, vllm_base = on_same["ceiling", "base"], on_same["hf", "base"], on_same["vllm", "base"]
        print(
            f"ceiling on {same.label}: {ceiling.tok_s:,.0f} tok/s from matrix products alone = {ceiling.tok_s / hf_base.tok_s:.1f}x HF base, "
            f"the most any engine can reach on this machine; vLLM base reaches {vllm_base.tok_s / ceiling.tok_s:.0%} of it"
        )
    if args.out:
        payload = {
            "fast_lora_env": fast_lora,
            "timings": [asdict(t) | {"tok_s": t.tok_s} for t in timings],
            "ratios": verdicts,
            "foreign_cpu_share": contention,
        }
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
