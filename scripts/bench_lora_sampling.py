"""Sampling throughput through vLLM on CPU: base model vs a live LoRA adapter, ours vs stock ops.

Each configuration runs in its own process (a fresh in-process vLLM engine; one at a time):
  base          no LoRA at all (`enable_lora=False`): the reference for every ratio
  ours r{R}     a random rank-R adapter on all seven projections, `max_lora_rank=R`, served with
                rlora's grouped-GEMM ops (`rlora.engine.vllm_plugin`)
  stock r16     the same at rank 16 with vLLM's own CPU ops (`RLORA_FAST_LORA=0`)
The configurations run round-robin for `--rounds` rounds (a fresh process each time), so that a
burst of other work on this shared machine hits different configurations in different rounds;
each process warms up with the timed batch shape, then measures `--repeats` times on fresh
prompts. The fastest measurement of each configuration is reported (others only slow a run down):
  prefill tok/s   distinct prompts, one new token each, prefix cache reset: prompt tokens / s
  sample tok/s    the RL workload (P prompts x G samples x T new tokens, `ignore_eos=True` so
                  lengths are fixed), prefix cache reset: generated tokens / s of the whole call
The table gives ratios to the base model measured in the same run, and each configuration's
spread (slowest / fastest sampling measurement) as a noise gauge.

Run it under the machine's heavy-job lock:
    flock /tmp/rlora-heavy.lock .venv/bin/python scripts/bench_lora_sampling.py --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from rlora.train.models import resolve_model

RANKS = (1, 8, 16, 64)
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STOCK_RANK = 16
TARGET_RATIO = 0.85


@dataclass(frozen=True)
class BenchConfig:
    name: str
    """Row label."""
    lora_rank: int
    """Adapter rank and `max_lora_rank`; 0 for the base model without LoRA."""
    adapter_dir: str
    """The rank-`lora_rank` PEFT adapter ("" for the base model)."""
    fast_lora: bool
    """rlora's grouped-GEMM ops (True) or vLLM's stock CPU ops (False)."""
    prompts: int
    """P distinct prompts."""
    samples: int
    """G samples per prompt."""
    new_tokens: int
    """T tokens generated per sample."""
    prompt_words: int
    """Length of each prompt's filler text, in words (sets the prefill size)."""
    repeats: int
    """Timed repetitions of each phase within one process (fresh prompts each time)."""


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    engine_start_s: float
    prefill_tokens: int
    """Prompt tokens per prefill repetition."""
    prefill_s: list[float]
    """Seconds of each prefill repetition."""
    sample_tokens: int
    """Generated tokens per sampling repetition."""
    sample_s: list[float]
    """Seconds of each sampling repetition."""

    def merged(self, other: BenchResult) -> BenchResult:
        """Both runs' measurements of the same configuration (another round)."""
        assert other.config == self.config, "merging different configurations"
        return BenchResult(
            self.config,
            min(self.engine_start_s, other.engine_start_s),
            self.prefill_tokens,
            self.prefill_s + other.prefill_s,
            self.sample_tokens,
            self.sample_s + other.sample_s,
        )

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / min(self.prefill_s)

    @property
    def sample_tok_s(self) -> float:
        return self.sample_tokens / min(self.sample_s)

    @property
    def sample_spread(self) -> float:
        """Slowest over fastest sampling repetition: how noisy this configuration's run was."""
        return max(self.sample_s) / min(self.sample_s)


WORDS = (
    "the quick brown fox jumps over a lazy dog while seven small birds sing about numbers "
    "rivers mountains and the long history of careful arithmetic in old market towns"
).split()


def make_prompts(count: int, words: int, offset: int) -> list[str]:
    """Distinct requests of about `words` + 20 tokens; `offset` keeps prompt sets disjoint."""
    prompts = []
    for i in range(offset, offset + count):
        filler = " ".join(WORDS[(i + 3 * k) % len(WORDS)] for k in range(words))
        prompts.append(f"Request {i}: what is {i % 9 + 1} + {i % 7 + 2}? Think aloud. {filler}")
    return prompts


def make_adapter(model_path: str, rank: int, out_dir: str) -> None:
    """A random (non-zero) PEFT adapter on all attention and MLP projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(rank)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=TARGET_MODULES,
        init_lora_weights=False,
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), config)
    model.save_pretrained(out_dir)


def run_config(config: BenchConfig) -> BenchResult:
    """Start one engine, warm up, time prefill and sampling. Call in a fresh process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["RLORA_FAST_LORA"] = "1" if config.fast_lora else "0"
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    model_path = resolve_model("default")
    lora_request = None
    lora_kwargs: dict[str, object] = {"enable_lora": False}
    if config.lora_rank > 0:
        lora_request = LoRARequest(f"bench-r{config.lora_rank}", 1, config.adapter_dir)
        lora_kwargs = {"enable_lora": True, "max_lora_rank": config.lora_rank, "max_loras": 1}

    start = time.perf_counter()
    llm = LLM(
        model=model_path,
        dtype="bfloat16",
        enforce_eager=True,
        block_size=32,
        max_model_len=1024,
        max_num_seqs=config.prompts * config.samples,
        enable_prefix_caching=True,
        **lora_kwargs,
    )
    engine_start_s = time.perf_counter() - start

    def generate(prompts: list[str], params: SamplingParams) -> tuple[int, int, float]:
        llm.reset_prefix_cache()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
        seconds = time.perf_counter() - start
        prompt_tokens = sum(len(out.prompt_token_ids or []) for out in outputs)
        new_tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
        return prompt_tokens, new_tokens, seconds

    words = config.prompt_words
    # Warm up with the timed batch shape: oneDNN builds its kernels per problem size.
    warm_up = SamplingParams(n=config.samples, max_tokens=4, ignore_eos=True)
    generate(make_prompts(config.prompts, words, 10_000), warm_up)
    one_token = SamplingParams(max_tokens=1, ignore_eos=True)
    sampling = SamplingParams(n=config.samples, temperature=1.0, max_tokens=config.new_tokens, ignore_eos=True)
    prefill_s, sample_s = [], []
    for rep in range(config.repeats):  # disjoint prompt sets: no prefix cache reuse
        offset = 2 * rep * config.prompts
        prompts = make_prompts(config.prompts, words, offset)
        prefill_tokens, _, seconds = generate(prompts, one_token)
        prefill_s.append(seconds)
        prompts = make_prompts(config.prompts, words, offset + config.prompts)
        _, sample_tokens, seconds = generate(prompts, sampling)
        sample_s.append(seconds)
        expected = config.prompts * config.samples * config.new_tokens
        assert sample_tokens == expected, f"generated {sample_tokens} tokens, expected {expected}"
    return BenchResult(config, engine_start_s, prefill_tokens, prefill_s, sample_tokens, sample_s)


def run_in_subprocess(config: BenchConfig) -> BenchResult:
    """One configuration per process: vLLM's in-process engine is not torn down cleanly."""
    marker = "RLORA_BENCH_RESULT "
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(asdict(config))],
        capture_output=True,
        text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(marker)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"{config.name}: worker failed with exit code {proc.returncode}")
    fields = json.loads(lines[-1][len(marker) :])
    return BenchResult(config=config, **fields)


def format_table(results: list[BenchResult]) -> str:
    base = results[0]
    assert base.config.lora_rank == 0, "the first result must be the base model"
    header = f"{'config':<12} {'max_rank':>8} {'start s':>8} {'prefill tok/s':>14} {'x base':>7} {'sample tok/s':>13} {'x base':>7} {'spread':>7}"
    rows = [header, "-" * len(header)]
    for r in results:
        rows.append(
            f"{r.config.name:<12} {r.config.lora_rank or '-':>8} {r.engine_start_s:>8.1f} "
            f"{r.prefill_tok_s:>14,.0f} {r.prefill_tok_s / base.prefill_tok_s:>7.2f} "
            f"{r.sample_tok_s:>13,.0f} {r.sample_tok_s / base.sample_tok_s:>7.2f} "
            f"{r.sample_spread:>7.2f}"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32, help="P distinct prompts")
    parser.add_argument("--samples", type=int, default=8, help="G samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="T new tokens per sample")
    parser.add_argument("--prompt-words", type=int, default=30, help="filler words per prompt")
    parser.add_argument("--ranks", type=int, nargs="*", default=list(RANKS))
    parser.add_argument("--rounds", type=int, default=2, help="round-robin rounds (best kept)")
    parser.add_argument("--repeats", type=int, default=1, help="timed repetitions per process")
    parser.add_argument("--no-stock", action="store_true", help="skip the slow stock-ops row")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # child process: one configuration
        result = run_config(BenchConfig(**json.loads(args.worker)))
        fields = {k: v for k, v in asdict(result).items() if k != "config"}
        print("RLORA_BENCH_RESULT " + json.dumps(fields), flush=True)
        return

    workload = (args.prompts, args.samples, args.new_tokens, args.prompt_words, args.repeats)
    adapters_dir = tempfile.mkdtemp(prefix="rlora-bench-adapters-")
    adapter_dirs = {}
    for rank in sorted({*args.ranks, STOCK_RANK}):
        adapter_dirs[rank] = os.path.join(adapters_dir, f"r{rank}")
        make_adapter(resolve_model("default"), rank, adapter_dirs[rank])
    configs = [BenchConfig("base", 0, "", True, *workload)]
    configs += [BenchConfig(f"ours r{rank}", rank, adapter_dirs[rank], True, *workload) for rank in args.ranks]
    stock_dir = adapter_dirs[STOCK_RANK]
    stock = BenchConfig(f"stock r{STOCK_RANK}", STOCK_RANK, stock_dir, False, *workload)
    print(
        f"workload: {args.prompts} prompts x {args.samples} samples x {args.new_tokens} new "
        f"tokens, bf16, in-process eager engine, max_loras=1, best of "
        f"{args.rounds} rounds x {args.repeats} repeats",
        flush=True,
    )
    by_name: dict[str, BenchResult] = {}
    for round_index in range(args.rounds):
        # Stock is about 7x slower: one measurement is plenty to show it.
        extra = [stock] if round_index == 0 and not args.no_stock else []
        for config in configs + extra:
            r = run_in_subprocess(config)
            print(
                f"  round {round_index + 1} {config.name}: prefill {r.prefill_tok_s:,.0f} tok/s, sample {r.sample_tok_s:,.0f} tok/s",
                flush=True,
            )
            previous = by_name.get(config.name)
            by_name[config.name] = r if previous is None else previous.merged(r)
    shutil.rmtree(adapters_dir)
    results = [by_name[c.name] for c in configs + ([] if args.no_stock else [stock])]
    print(format_table(results))
    base = results[0]
    ours = [r for r in results if r.config.lora_rank > 0 and r.config.fast_lora]
    worst = min((r.sample_tok_s / base.sample_tok_s for r in ours), default=float("nan"))
    print(f"worst sampling ratio with our ops: {worst:.2f} (target >= {TARGET_RATIO})")
    if args.out:
        payload = [asdict(r) | {"prefill_tok_s": r.prefill_tok_s, "sample_tok_s": r.sample_tok_s} for r in results]
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)


if __name__ == "__main__":
    main()
