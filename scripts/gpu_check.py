"""Device check of the learner side: rank-1 LoRA vs FullFT step time and peak memory, beside the plan's prediction.

Needs PyTorch, transformers, peft and accelerate; no vLLM, no Hub: models are random weights of a
known architecture (`rlora.plan.KNOWN_ARCHITECTURES`, or a local folder's config.json), built
directly on the device. Each (model, arm) runs in its own process, so one's memory never counts
in another's peak. Per arm: two optimizer steps on a random batch (every row `--seq-len` tokens,
the last `--completion` of them trained on); the second step is timed and its peak measured:
`torch.cuda.max_memory_allocated` on a GPU, the resident-set high-water mark (VmHWM, reset
through /proc/self/clear_refs) minus the process's size before the model on CPU.

FullFT of an 8B model needs 128 GB of float32 state, more than one GPU: the check keeps the
architecture but cuts the decoder to `--layers` layers (default 8 for 8B models), the same for
both arms, so their ratio is fair; LoRA also runs on the whole model.

On one H100/H200 (about 4-6 minutes):
    python scripts/gpu_check.py
On CPU, with a small architecture (what tests/test_plan.py runs):
    python scripts/gpu_check.py --device cpu --models default --dtype float32 --micro-batch 4 --seq-len 96 --completion 48
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing rlora

GPU_CASES = (("meta-llama/Llama-3.1-8B", 8, "lora"), ("meta-llama/Llama-3.1-8B", 8, "full"), ("meta-llama/Llama-3.1-8B", 0, "lora"))
GPU_CASES += (("meta-llama/Llama-3.2-1B", 0, "lora"), ("meta-llama/Llama-3.2-1B", 0, "full"))


@dataclass(frozen=True, kw_only=True)
class Case:
    model: str
    layers: int  # 0: the architecture's own
    arm: str  # lora (rank 1) | full
    device: str
    dtype: str
    micro_batch: int
    rows: int  # rows per step (micro-batches of micro_batch)
    seq_len: int
    completion: int


@dataclass(frozen=True, kw_only=True)
class Result:
    case: Case
    params: int
    predicted_peak: int  # bytes: the plan's learner peak
    measured_peak: int
    step_s: float

    def row(self) -> str:
        c = self.case
        ratio = self.measured_peak / self.predicted_peak
        layers = f"{c.layers} layers" if c.layers else "all layers"
        return (
            f"| {c.model} ({layers}, {self.params / 1e9:.2f}B) | {'rank 1' if c.arm == 'lora' else 'FullFT'} | "
            f"{self.step_s:.2f} | {self.predicted_peak / 2**30:.2f} | {self.measured_peak / 2**30:.2f} | {ratio:.2f} |"
        )


def config_of(case: Case) -> object:
    from rlora.plan import model_config

    config = model_config(case.model)
    if case.layers:
        config.num_hidden_layers = case.layers  # type: ignore[attr-defined]
    return config


def plan_peak(case: Case, config: object) -> tuple[int, int]:
    """(parameters, the plan's learner peak in bytes) for this case."""
    from rlora.plan import LearnerShape, architecture_of, learner_memory
    from rlora.train.lora import TARGETS_ALL_LINEAR

    arch = architecture_of(config, case.model)
    shape = LearnerShape(
        full=case.arm == "full",
        trainable=arch.params if case.arm == "full" else arch.lora_params(1, TARGETS_ALL_LINEAR),
        compute_bytes=2 if case.dtype == "bfloat16" else 4,
        shards=1,
        rows=case.micro_batch,
        seq_len=case.seq_len,
        completion_tokens=case.micro_batch * case.completion,
        cuda=case.device.startswith("cuda"),
    )
    return arch.params, learner_memory(arch, shape).peak


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def random_batch(case: Case, vocab: int) -> object:
    import torch

    from rlora.rl.types import TrainBatch

    g = torch.Generator().manual_seed(0)
    B, T = case.rows, case.seq_len
    tokens = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.zeros(B, T)
    mask[:, T - 1 - case.completion : T - 1] = 1
    return TrainBatch(
        tokens_B_T=tokens,
        targets_B_T=torch.roll(tokens, -1, dims=1),
        mask_B_T=mask,
        sampler_logprobs_B_T=-mask,
        advantages_B=torch.tensor([1.0 if i % 2 else -1.0 for i in range(B)]),
        lengths_B=torch.full((B,), T),
        staleness_B=torch.zeros(B, dtype=torch.int64),
    )


def run_case(case: Case) -> Result:
    """One (model, arm) in this process: build, two steps, measure the second."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlora.rl.losses import LossSpec
    from rlora.train.learner import Learner, LearnerSpec, prepare_policy
    from rlora.train.lora import LoRASpec

    cuda = case.device.startswith("cuda")
    config = config_of(case)
    params, predicted = plan_peak(case, config)
    before = 0 if cuda else rss_bytes("VmRSS")
    torch.manual_seed(0)
    # random weights straight on the device (no host copy of an 8B model); float32 as the learner loads them
    with torch.device(case.device):
        model = AutoModelForCausalLM.from_config(
            config
        ).float()  # float32, whatever the config names; no dtype keyword (older transformers call it torch_dtype)
    spec = LearnerSpec(
        model_path=case.model,
        lora=LoRASpec(rank=1) if case.arm == "lora" else None,
        lr=1e-5,
        device=case.device,
        dtype=case.dtype,
        micro_batch=case.micro_batch,
    )
    learner = Learner(spec, model=prepare_policy(model, spec))
    batch = random_batch(case, int(config.vocab_size))  # type: ignore[attr-defined]
    loss, norm = LossSpec(loss="tis", cap=2.0, temperature=1.0), float(case.rows * case.completion)
    learner.train_step(batch, loss, norm)  # type: ignore[arg-type]  # step 1 creates the AdamW state
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    learner.train_step(batch, loss, norm)  # type: ignore[arg-type]
    if cuda:
        torch.cuda.synchronize()
    step_s = time.perf_counter() - start
    measured = torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM") - before
    return Result(case=case, params=params, predicted_peak=predicted, measured_peak=measured, step_s=step_s)


def run_isolated(case: Case) -> Result:
    """`run_case` in a child process; large allocations are mmapped so that freed memory leaves the RSS."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(asdict(case))], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{case.model} {case.arm} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return Result(**{**data, "case": Case(**data["case"])})


def cases(args: argparse.Namespace) -> list[Case]:
    common = dict(
        device=args.device,
        dtype=args.dtype,
        micro_batch=args.micro_batch,
        rows=args.micro_batch * args.micro_batches,
        seq_len=args.seq_len,
        completion=args.completion,
    )
    if args.models:
        return [Case(model=m, layers=args.layers, arm=arm, **common) for m in args.models.split(",") for arm in ("lora", "full")]  # type: ignore[arg-type]
    return [Case(model=m, layers=layers, arm=arm, **common) for m, layers, arm in GPU_CASES]  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--models", default="", help="comma list (each as lora and full, --layers layers); default: the GPU cases")
    parser.add_argument("--layers", type=int, default=0, help="with --models: cut the decoder to this many layers (0 = all)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--seq-len", type=int, default=768)
    parser.add_argument("--completion", type=int, default=512)
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(asdict(run_case(Case(**json.loads(args.one))))))
        return []
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device; use --device cpu with a small architecture (--models default)")
        print(f"device: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
    print(f"{args.micro_batches} x {args.micro_batch} rows of {args.seq_len} tokens ({args.completion} trained), {args.dtype}\n")
    print("| model | arm | step s | plan peak GiB | measured peak GiB | measured/plan |\n| --- | --- | --- | --- | --- | --- |", flush=True)
    results = []
    for case in cases(args):
        result = run_isolated(case)
        print(result.row(), flush=True)
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
