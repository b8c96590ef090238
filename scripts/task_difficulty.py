"""Calibrate a synthetic task's difficulty: the base model's reward at several settings, one engine.

For each (arith_max, arith_terms) setting: N held-out `arith_chain` problems (the benchmark's own
split, `rlora.data.SYNTHETIC_BENCHMARKS`), G samples each at temperature 1 from the default model
(SmolLM2-135M-Instruct, vLLM on CPU in float32), rendered and graded exactly as an RL step does
(`rlora.data.make_prompt`, `rewards.grade(..., "number")`). Per setting it reports:
- reward: mean over every sample (the base policy's expected RL reward), with its standard error
  over problems;
- mixed: the share of problems whose G rewards are not all equal. Only those groups carry an RL
  gradient (group-centred advantages are zero otherwise), so this is the signal a step gets;
- all_0 / all_1: the shares of dead groups on either side;
- length: the share of samples cut at max_tokens (finish_reason "length"), and completion tokens
  (mean, 95th percentile), to check that max_tokens does not cut answers.

The settings share one engine start; each row is printed (and saved with --out) as it lands.
Run it under the machine's heavy-job lock:
    flock /tmp/rlora-heavy.lock .venv/bin/python scripts/task_difficulty.py --out task_difficulty.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import rewards
from rlora.data import SYNTHETIC_BENCHMARKS, ArithChain, make_prompt
from rlora.engine.sampler import EngineSpec, Sampler
from rlora.rl.types import Sample
from rlora.train.models import resolve_model

DEFAULT_SETTINGS = "9x3,9x4,9x5,20x3,50x2,50x3,99x2,99x3"


@dataclass(frozen=True)
class SettingResult:
    """The base model on one difficulty setting."""

    arith_max: int
    arith_terms: int
    problems: int
    samples: int  # G per problem
    reward: float  # mean reward over all samples
    reward_se: float  # standard error over problems of the per-problem means
    mixed: float  # share of problems whose G rewards are not all equal (groups with an RL signal)
    all_0: float
    all_1: float
    length: float  # share of samples with finish_reason "length"
    mean_tokens: float
    p95_tokens: float


def parse_settings(spec: str) -> list[ArithChain]:
    """`9x3,99x2` -> ArithChain(9, 3), ArithChain(99, 2)."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        max_operand, _, terms = item.partition("x")
        if not (max_operand.isdigit() and terms.isdigit()):
            raise SystemExit(f"--settings: {item!r} is not MAXxTERMS (e.g. 99x3)")
        out.append(ArithChain(int(max_operand), int(terms)))
    return out


def summarize(chain: ArithChain, samples_P_G: list[list[Sample]], rewards_P_G: list[list[float]]) -> SettingResult:
    means_P = np.array([np.mean(r) for r in rewards_P_G])
    tokens = np.array([len(s.completion_ids) for group in samples_P_G for s in group])
    return SettingResult(
        arith_max=chain.max_operand,
        arith_terms=chain.terms,
        problems=len(rewards_P_G),
        samples=len(rewards_P_G[0]),
        reward=float(means_P.mean()),
        reward_se=float(means_P.std(ddof=1) / math.sqrt(len(means_P))),
        mixed=float(np.mean([len(set(r)) > 1 for r in rewards_P_G])),
        all_0=float(np.mean([max(r) == 0 for r in rewards_P_G])),
        all_1=float(np.mean([min(r) == 1 for r in rewards_P_G])),
        length=float(np.mean([s.finish_reason == "length" for group in samples_P_G for s in group])),
        mean_tokens=float(tokens.mean()),
        p95_tokens=float(np.percentile(tokens, 95)),
    )


def table(results: list[SettingResult]) -> str:
    lines = [
        "| arith_max | arith_terms | reward ± se | mixed groups | all 0 | all 1 | cut at max_tokens | mean tokens | p95 tokens |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.arith_max} | {r.arith_terms} | {r.reward:.3f} ± {r.reward_se:.3f} | {r.mixed:.2f} | {r.all_0:.2f} | {r.all_1:.2f} "
            f"| {r.length:.3f} | {r.mean_tokens:.1f} | {r.p95_tokens:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma list of ARITH_MAXxARITH_TERMS")
    ap.add_argument("--problems", type=int, default=150, help="held-out problems per setting")
    ap.add_argument("--group", type=int, default=8, help="samples per problem (an RL group)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--prompt-format", default="auto", help="as config key prompt_format (auto = chat for the default model)")
    ap.add_argument("--model", default="default")
    # float32 KV of the 135M model is ~46 KB/token: 1 GiB holds ~23k tokens, fewer than 256 sequences of
    # prompt + 128 new tokens, and an engine short of KV cache preempts and recomputes sequences endlessly
    ap.add_argument("--kv-cache-gib", type=float, default=4.0, help="vLLM KV cache on CPU")
    ap.add_argument("--max-num-seqs", type=int, default=128, help="sequences the engine runs at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    settings = parse_settings(args.settings)
    problems_S = [SYNTHETIC_BENCHMARKS["arith_chain"](chain, args.problems) for chain in settings]  # bad settings fail before the engine
    start = time.perf_counter()
    sampler = Sampler(
        EngineSpec(
            model_path=resolve_model(args.model),
            device="cpu",
            dtype="float32",
            lora_rank=None,
            kv_cache_gib=args.kv_cache_gib,
            max_model_len=512,
            max_num_seqs=args.max_num_seqs,
            seed=args.seed,
        )
    )
    engine_s = time.perf_counter() - start
    run = {k: v for k, v in vars(args).items() if k != "out"}
    results: list[SettingResult] = []
    examples: list[dict[str, object]] = []  # the first two samples of each setting's first three problems
    try:
        for chain, problems in zip(settings, problems_S):  # one engine call per setting: each row is printed and saved as it lands
            start = time.perf_counter()
            samples_P_G = sampler.sample(
                [make_prompt(p, sampler.tokenizer, args.prompt_format) for p in problems], args.group, args.max_tokens, args.temperature
            )
            rewards_P_G = [[rewards.grade(s.text, p.reference, p.reward_task) for s in group] for p, group in zip(problems, samples_P_G)]
            results.append(summarize(chain, samples_P_G, rewards_P_G))
            examples += [{"question": p.question, "reference": p.reference, "completions": [s.text for s in g[:2]]} for p, g in zip(problems[:3], samples_P_G)]
            print(
                f"{chain.max_operand}x{chain.terms}: reward {results[-1].reward:.3f}, mixed {results[-1].mixed:.2f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
            if args.out:
                payload = {"settings": run, "engine_s": engine_s, "results": [asdict(r) for r in results], "examples": examples}
                Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    finally:
        sampler.close()
    print(table(results))
    print(f"\nengine ready in {engine_s:.0f} s")


if __name__ == "__main__":
    main()
