"""Evaluation on MATH500, AIME24, AIME25 and GSM8K, graded by the RL reward itself.

For each benchmark, K completions per problem come from a `Sampler` (the same vLLM engine, chat
template and prompt as RL), and each is graded by `rewards.grade(completion, gold, task)`, the
very function that is the RL reward: a training curve and an evaluation number mean the same
thing, and a grader fix changes both.

Metrics of a benchmark with P problems, K samples each, c_p of them correct on problem p:
- avg@K = (1/P) sum_p c_p / K, with the standard error of the mean over problems: the standard
  deviation (ddof 1) of the P per-problem means over sqrt(P). Problems are the sample; the K
  draws only make each per-problem mean less noisy (Miller 2024, "Adding error bars to evals").
  With one problem the error is undefined: None (null in JSON, `-` in tables).
- pass@k for k = 1, 2, 4, ... up to K (and K itself): the unbiased estimator of Chen et al.
  2021, 1 - C(K - c_p, k) / C(K, k), averaged over problems. pass@1 equals avg@K.
- by subject and by level for MATH500 (any benchmark whose problems carry that metadata).
- diagnostics: the share of completions with an extractable final answer (`answered`), the share
  cut at max_tokens (`truncated`), mean completion tokens.

Every completion is saved with its grade (`completions.jsonl`); `recompute(path)` rebuilds the
same numbers from that file alone, and `recompute(path, regrade=True)` grades the saved
completions again with the current grader (a grader fix without resampling).

`rlora eval` resolves what to evaluate (a base model, `--adapter`, `--checkpoint`, or `--run`
plus `--step`) and checks every input (benchmarks, model, adapter, checkpoint, output folder,
tokenizer, prompt lengths) before it starts an engine. Inside an RL run, `eval_policy` evaluates
the live sampler: one greedy completion (T = 0) per problem at the run's `max_tokens`, so
`eval/<benchmark>/avg@1` changes only when the policy does, not with sampling noise.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import rewards
from rlora.config import RLConfig
from rlora.data import BENCHMARKS, SYNTHETIC_BENCHMARKS, ArithChain, DataError, Problem, load_benchmark, make_prompt
from rlora.devices import resolve_device, resolve_dtype
from rlora.engine.sampler import EngineSpec, Sampler
from rlora.rl.types import Prompt, Sample, Tokenizer
from rlora.runs import RunDir
from rlora.train.models import resolve_model

BenchmarkMetrics = dict[str, object]  # scalar metrics plus `by_<meta key>` breakdowns, as written to results.json
BREAKDOWNS = ("subject", "level")

# ------------------------------------------------------------------------------------ metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n - c, k) / C(n, k) (Chen et al. 2021).

    Computed as the product 1 - prod_{i = n - c + 1}^{n} (1 - k / i), which never forms the
    (huge) binomial coefficients.
    """
    assert 0 <= c <= n and 1 <= k <= n, f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}"
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def avg_at_k(scores_P_K: Sequence[Sequence[float]]) -> tuple[float, float | None]:
    """(avg@K, its standard error over problems) from each problem's K grades."""
    assert scores_P_K and all(len(s) == len(scores_P_K[0]) > 0 for s in scores_P_K), "need K >= 1 grades for every problem"
    means_P = np.array([float(np.mean(s)) for s in scores_P_K])
    se = float(means_P.std(ddof=1) / math.sqrt(len(means_P))) if len(means_P) > 1 else None
    return float(means_P.mean()), se


def pass_ks(samples: int) -> list[int]:
    """k = 1, 2, 4, ... below K, then K."""
    ks = [k for k in (2**i for i in range(samples.bit_length())) if k < samples]
    return ks + [samples]


# ------------------------------------------------------------------------------------ graded completions


@dataclass(frozen=True)
class ScoredCompletion:
    """One completion with its grade: a row of completions.jsonl."""

    benchmark: str
    problem_id: str
    sample: int  # index among the problem's K samples
    task: str  # rewards task that graded it
    reference: str  # gold answer
    meta: dict[str, str]  # e.g. subject and level for MATH500
    question: str
    completion: str
    answer: str | None  # the final answer the grader extracted; None if it found none
    score: float  # rewards.grade(completion, reference, task)
    finish_reason: str  # "stop" or "length"
    num_tokens: int


def score_samples(benchmark: str, problem: Problem, samples_K: Sequence[Sample], reward_policy: str = "default") -> list[ScoredCompletion]:
    return [
        ScoredCompletion(
            benchmark,
            problem.problem_id,
            i,
            problem.reward_task,
            problem.reference,
            dict(problem.meta),
            problem.question,
            s.text,
            rewards.extract_answer(s.text, problem.reward_task, policy=reward_policy),
            rewards.grade(s.text, problem.reference, problem.reward_task, policy=reward_policy),
            s.finish_reason,
            len(s.completion_ids),
        )
        for i, s in enumerate(samples_K)
    ]


def _metrics(groups: Sequence[Sequence[ScoredCompletion]]) -> dict[str, float | None]:
    scores_P_K = [[g.score for g in group] for group in groups]
    samples = len(scores_P_K[0])
    avg, se = avg_at_k(scores_P_K)
    out: dict[str, float | None] = {"problems": len(groups), "samples": samples, f"avg@{samples}": avg, f"avg@{samples}_se": se}
    for k in pass_ks(samples):
        out[f"pass@{k}"] = float(np.mean([pass_at_k(samples, int(sum(s)), k) for s in scores_P_K]))
    return out


def summarize(completions: Sequence[ScoredCompletion]) -> dict[str, BenchmarkMetrics]:
    """Per-benchmark metrics from graded completions (in any order; K must be equal per benchmark)."""
    by_bench: dict[str, dict[str, list[ScoredCompletion]]] = {}
    for c in completions:
        by_bench.setdefault(c.benchmark, {}).setdefault(c.problem_id, []).append(c)
    results: dict[str, BenchmarkMetrics] = {}
    for bench, by_problem in by_bench.items():
        groups = [sorted(g, key=lambda c: c.sample) for g in by_problem.values()]
        ks = {len(g) for g in groups}
        assert len(ks) == 1, f"{bench}: problems have different numbers of samples {sorted(ks)}"
        flat = [c for g in groups for c in g]
        metrics: BenchmarkMetrics = {
            **_metrics(groups),
            "answered": float(np.mean([c.answer is not None for c in flat])),
            "truncated": float(np.mean([c.finish_reason == "length" for c in flat])),
            "mean_tokens": float(np.mean([c.num_tokens for c in flat])),
        }
        for key in BREAKDOWNS:
            values = sorted({g[0].meta[key] for g in groups if key in g[0].meta})
            if values:
                metrics[f"by_{key}"] = {v: _metrics([g for g in groups if g[0].meta.get(key) == v]) for v in values}
        results[bench] = metrics
    return results


def read_completions(path: str | Path) -> list[ScoredCompletion]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"completions file {path} does not exist")
    return [ScoredCompletion(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def recompute(path: str | Path, regrade: bool = False, reward_policy: str = "default") -> dict[str, BenchmarkMetrics]:
    """The benchmarks' metrics from a saved completions.jsonl, optionally graded again."""
    completions = read_completions(path)
    if regrade:
        completions = [
            ScoredCompletion(
                **{
                    **asdict(c),
                    "answer": rewards.extract_answer(c.completion, c.task, policy=reward_policy),
                    "score": rewards.grade(c.completion, c.reference, c.task, policy=reward_policy),
                }
            )
            for c in completions
        ]
    return summarize(completions)


# ------------------------------------------------------------------------------------ evaluating a sampler


def load_benchmarks(names: Sequence[str], limit: int = 0, data_dir: str = "", arith: ArithChain | None = None) -> dict[str, list[Problem]]:
    """Every named benchmark, loaded up front so that a bad name or file fails before sampling.

    A synthetic benchmark (`arith_chain`) is the held-out split generated at difficulty `arith`:
    a run's own arith_max and arith_terms (`default_arith()` when None).

    Each gold answer, boxed, is graded against itself: a problem the grader cannot score even
    then would silently count as wrong, so it is reported.
    """
    unknown = [n for n in names if n not in BENCHMARKS and n not in SYNTHETIC_BENCHMARKS]
    if unknown or not names:
        known = ", ".join([*BENCHMARKS, *SYNTHETIC_BENCHMARKS])
        raise DataError(f"unknown benchmark {unknown[0] if unknown else '(none given)'!r}; known: {known}")
    problems = {name: load_benchmark(name, data_dir, limit, arith or default_arith()) for name in dict.fromkeys(names)}
    for name, ps in problems.items():
        unscorable = [p.problem_id for p in ps if rewards.grade(f"The answer is \\boxed{{{p.reference}}}.", p.reference, p.reward_task) != 1.0]
        if unscorable:  # a grader/data mismatch: these problems score 0 whatever the policy writes
            print(f"warning: {name}: the grader rejects the gold answer itself on {len(unscorable)} problems, e.g. {unscorable[:3]}", file=sys.stderr)
    return problems


def default_arith() -> ArithChain:
    """The synthetic difficulty of RLConfig's defaults (keys arith_max, arith_terms)."""
    return ArithChain(RLConfig.arith_max, RLConfig.arith_terms)


def arith_of_config(config: Mapping[str, object]) -> ArithChain:
    """A run's synthetic difficulty from its config.json (an older run without arith_terms gets the default)."""
    default = default_arith()
    max_operand, terms = config.get("arith_max", default.max_operand), config.get("arith_terms", default.terms)
    assert isinstance(max_operand, int) and isinstance(terms, int), f"config arith_max/arith_terms must be integers, got {max_operand!r}, {terms!r}"
    return ArithChain(max_operand, terms)


def parse_benchmarks(spec: str) -> list[str]:
    return [b.strip() for b in spec.split(",") if b.strip()]


def _prompts(problems: Sequence[Problem], tokenizer: Tokenizer, prompt_format: str = "auto") -> list[Prompt]:
    return [make_prompt(p, tokenizer, prompt_format) for p in problems]


def check_lengths(benchmark: str, prompts: Sequence[Prompt], max_tokens: int, max_model_len: int) -> None:
    longest = max(prompts, key=lambda p: len(p.prompt_ids))
    if len(longest.prompt_ids) + max_tokens > max_model_len:
        raise ValueError(
            f"{benchmark} problem {longest.problem_id}: {len(longest.prompt_ids)} prompt tokens + {max_tokens} new tokens "
            f"exceed the engine's max_model_len {max_model_len}; raise max_model_len or lower the limit/max_tokens"
        )


def evaluate_problems(
    sampler: Sampler,
    problems_by_bench: Mapping[str, Sequence[Problem]],
    samples: int,
    temperature: float,
    max_tokens: int,
    out_dir: Path | None = None,
    settings: Mapping[str, object] | None = None,
    progress: bool = True,
    runtime: Mapping[str, object] | None = None,
    reward_policy: str = "default",
    prompt_format: str = "auto",
) -> dict[str, object]:
    """Sample, grade and summarize; with `out_dir`, write results.json, results.md and completions.jsonl.

    Returns {"settings", "benchmarks": {name: metrics}, "runtime"}. Problems go to the engine in
    chunks that fill its batch (`max_num_seqs`), so the progress bar moves per chunk.
    """
    assert samples >= 1 and max_tokens >= 1, "need samples >= 1 and max_tokens >= 1"
    tokenizer = sampler.tokenizer
    prompts_by_bench = {b: _prompts(ps, tokenizer, prompt_format) for b, ps in problems_by_bench.items()}
    for bench, prompts in prompts_by_bench.items():
        check_lengths(bench, prompts, max_tokens, sampler.spec.max_model_len)
    chunk = max(1, sampler.spec.max_num_seqs // samples)
    completions: list[ScoredCompletion] = []
    timings: dict[str, object] = dict(runtime or {})
    bar = tqdm(total=sum(len(p) for p in problems_by_bench.values()), unit="problem", disable=not progress, file=sys.stderr)
    for bench, problems in problems_by_bench.items():
        bar.set_description(f"eval {bench}")
        prompts, sample_s, grade_s, tokens = prompts_by_bench[bench], 0.0, 0.0, 0
        for start in range(0, len(problems), chunk):
            t0 = time.perf_counter()
            groups_P_K = sampler.sample(prompts[start : start + chunk], samples, max_tokens, temperature)
            t1 = time.perf_counter()
            for problem, samples_K in zip(problems[start : start + chunk], groups_P_K):
                graded = score_samples(bench, problem, samples_K, reward_policy)
                completions.extend(graded)
                tokens += sum(g.num_tokens for g in graded)
                bar.update(1)
            sample_s, grade_s = sample_s + t1 - t0, grade_s + time.perf_counter() - t1
        timings[bench] = {
            "sample_s": sample_s,
            "grade_s": grade_s,
            "completion_tokens": tokens,
            "problems_per_min": 60 * len(problems) / (sample_s + grade_s),
            "tokens_per_s": tokens / sample_s,
        }
    bar.close()
    results = {
        "settings": {**(settings or {}), "samples": samples, "temperature": temperature, "max_tokens": max_tokens},
        "benchmarks": summarize(completions),
        "runtime": timings,
    }
    if out_dir is not None:
        write_outputs(out_dir, results, completions)
    return results


def evaluate(
    sampler: Sampler,
    benchmarks: Sequence[str],
    samples: int,
    temperature: float,
    max_tokens: int,
    limit: int = 0,
    data_dir: str = "",
    out_dir: Path | None = None,
    progress: bool = True,
    prompt_format: str = "auto",
) -> dict[str, object]:
    """Evaluate whatever policy `sampler` serves now on the named benchmarks."""
    problems = load_benchmarks(benchmarks, limit, data_dir)
    settings = {"limit": limit, "data_dir": data_dir, "prompt_format": prompt_format}
    return evaluate_problems(sampler, problems, samples, temperature, max_tokens, out_dir, settings, progress, prompt_format=prompt_format)


EVAL_KEYS = ("answered", "truncated", "mean_tokens")


def eval_policy(
    sampler: Sampler,
    problems_by_bench: Mapping[str, Sequence[Problem]],
    max_tokens: int,
    prompt_format: str,
    out_dir: Path | None,
    reward_policy: str = "default",
) -> dict[str, float | None]:
    """RL's periodic evaluation of the live policy: one greedy sample per problem.

    Returns metrics-row keys `eval/<benchmark>/avg@1`, `.../avg@1_se`, `.../answered`,
    `.../truncated`, `.../mean_tokens`, and `eval_s`.
    """
    start = time.perf_counter()
    settings = {"periodic": True, "prompt_format": prompt_format, "reward_policy": rewards.describe_policy(reward_policy)}
    results = evaluate_problems(
        sampler, problems_by_bench, 1, 0.0, max_tokens, out_dir, settings, progress=False, prompt_format=prompt_format, reward_policy=reward_policy
    )
    row: dict[str, float | None] = {}
    benchmarks = results["benchmarks"]
    assert isinstance(benchmarks, dict)
    for bench, metrics in benchmarks.items():
        for key in ("avg@1", "avg@1_se", *EVAL_KEYS):
            row[f"eval/{bench}/{key}"] = metrics[key]
    row["eval_s"] = time.perf_counter() - start
    return row


# ------------------------------------------------------------------------------------ outputs


def _fmt(x: object) -> str:
    return f"{x:.3f}" if isinstance(x, float) else "-" if x is None else str(x)


def _pm(value: object, se: object) -> str:
    return f"{_fmt(value)} ± {_fmt(se)}"


def markdown(results: Mapping[str, object]) -> str:
    """The benchmarks table, then one table per breakdown (MATH500 by subject and by level)."""
    benchmarks: Mapping[str, BenchmarkMetrics] = results["benchmarks"]  # type: ignore[assignment]
    samples = next(iter(benchmarks.values()))["samples"]
    passes = [f"pass@{k}" for k in pass_ks(int(samples))]  # type: ignore[call-overload]
    avg = f"avg@{samples}"
    lines = [
        f"| benchmark | problems | {avg} ± se | {' | '.join(passes)} | answered | truncated | mean tokens |",
        "| --- " * (6 + len(passes)) + "|",
    ]
    for bench, m in benchmarks.items():
        cells = [bench, m["problems"], _pm(m[avg], m[avg + "_se"]), *(m[p] for p in passes), m["answered"], m["truncated"], f"{m['mean_tokens']:.1f}"]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    for bench, m in benchmarks.items():
        for key in BREAKDOWNS:
            groups: Mapping[str, Mapping[str, float]] = m.get(f"by_{key}", {})  # type: ignore[assignment]
            if groups:
                lines += ["", f"{bench} by {key}", "", f"| {key} | problems | {avg} ± se |", "| --- | --- | --- |"]
                lines += [f"| {v} | {g['problems']} | {_pm(g[avg], g[avg + '_se'])} |" for v, g in groups.items()]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, results: Mapping[str, object], completions: Sequence[ScoredCompletion]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "completions.jsonl").open("w") as f:
        for c in completions:
            f.write(json.dumps(asdict(c)) + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    settings = results["settings"]
    assert isinstance(settings, dict)
    header = "# Evaluation\n\n" + "".join(f"- {k}: {v}\n" for k, v in settings.items()) + "\n"
    (out_dir / "results.md").write_text(header + markdown(results))


# ------------------------------------------------------------------------------------ `rlora eval`


@dataclass(frozen=True)
class Policy:
    """What `rlora eval` evaluates: a base model, plus a LoRA adapter or full fine-tuned weights."""

    model: str  # as given ("default", a folder or a Hub name); resolved when the engine is built
    dtype: str
    adapter: Path | None = None  # PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
    adapter_rank: int = 0  # the adapter's r; the engine's max_lora_rank must be >= it
    weights: Path | None = None  # FullFT checkpoint's trainable.pt: every weight, in HF checkpoint names
    label: str = ""  # for results.json: where the policy came from
    prompt_format: str = "auto"  # how questions become prompts (rlora.data.PROMPT_FORMATS); a run's own, for its checkpoints
    arith: ArithChain | None = None  # a run's synthetic difficulty (arith_max, arith_terms): the arith_chain benchmark it is tested on


def check_adapter(path: Path) -> int:
    """The rank of a PEFT adapter folder; a clear error if it is not one."""
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).exists():
            raise FileNotFoundError(f"adapter {path} has no {name} (expected a PEFT adapter folder)")
    rank = json.loads((path / "adapter_config.json").read_text()).get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"adapter {path}: adapter_config.json has no integer rank 'r' (got {rank!r})")
    return rank


def policy_from_checkpoint(ckpt: Path, model: str | None, dtype: str | None) -> Policy:
    """A run checkpoint (`checkpoints/step_N`): its `adapter/` for LoRA, `trainable.pt` for FullFT."""
    if not (ckpt / "trainable.pt").exists():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist or has no trainable.pt")
    config_path = ckpt.parent.parent / "config.json"
    config: dict[str, object] = json.loads(config_path.read_text()) if config_path.exists() else {}
    model = model or str(config.get("model") or "default")
    dtype = dtype or str(config.get("dtype") or "auto")
    prompt_format = str(config.get("prompt_format") or "auto")  # evaluate the policy on the prompts it was trained on
    arith = arith_of_config(config) if config else None  # and on held-out problems of the difficulty it was trained at
    if (ckpt / "adapter").is_dir():
        return Policy(model, dtype, ckpt / "adapter", check_adapter(ckpt / "adapter"), label=str(ckpt), prompt_format=prompt_format, arith=arith)
    if config.get("rank") == "full":
        return Policy(model, dtype, weights=ckpt / "trainable.pt", label=str(ckpt), prompt_format=prompt_format, arith=arith)
    raise FileNotFoundError(f"checkpoint {ckpt} has no adapter/ and {config_path} does not say rank 'full': cannot tell LoRA from FullFT")


def resolve_policy(model: str | None, adapter: str | None, checkpoint: str | None, run: str | None, step: int | None, dtype: str | None) -> Policy:
    """Check the `rlora eval` target options and find every file they name; starts nothing."""
    if sum(x is not None for x in (adapter, checkpoint, run)) > 1:
        raise ValueError("give at most one of --adapter, --checkpoint, --run")
    if step is not None and run is None:
        raise ValueError("--step needs --run")
    if run is not None:
        run_dir = RunDir(run)
        if not run_dir.config_path.exists():
            raise FileNotFoundError(f"{run_dir.config_path} does not exist: {run} is not a run directory")
        if step is None:
            latest = run_dir.latest_checkpoint()
            if latest is None:
                raise FileNotFoundError(f"run {run} has no checkpoint")
            return policy_from_checkpoint(latest, model, dtype)
        return policy_from_checkpoint(run_dir.checkpoint_at(step), model, dtype)
    if checkpoint is not None:
        return policy_from_checkpoint(Path(checkpoint), model, dtype)
    if adapter is not None:
        return Policy(model or "default", dtype or "auto", Path(adapter), check_adapter(Path(adapter)), label=adapter)
    return Policy(model or "default", dtype or "auto", label=model or "default")


@dataclass(frozen=True, kw_only=True)
class EvalRequest:
    """Everything `rlora eval` was asked to do, checked by `run_eval` before any engine starts."""

    policy: Policy
    benchmarks: tuple[str, ...]
    samples: int = 4
    temperature: float = 1.0
    max_tokens: int = 1024
    limit: int = 0  # first L problems of each benchmark; 0 = all
    data_dir: str = ""  # local JSONL files in the Hub schemas; "" = the Hub
    out: Path = Path("eval")
    device: str = "auto"
    kv_cache_gib: float = 2.0  # CPU only
    gpu_memory_utilization: float = 0.85  # CUDA only: the engine is alone on the GPU
    max_num_seqs: int = 256
    seed: int = 0
    reward_policy: str = "default"  # rewards.POLICIES: how the final answer is found (recorded in results.json)
    prompt_format: str = ""  # "" = the policy's (a run's own, else auto)
    arith: ArithChain | None = None  # difficulty of the arith_chain benchmark; None = the policy's (a run's own), else default_arith()


def run_eval(req: EvalRequest, progress: bool = True) -> dict[str, object]:
    """`rlora eval`: validate everything, start an engine serving the policy, evaluate, write OUT."""
    if req.samples < 1 or req.max_tokens < 1 or req.limit < 0:
        raise ValueError(f"need --samples >= 1, --max-tokens >= 1, --limit >= 0 (got {req.samples}, {req.max_tokens}, {req.limit})")
    if req.temperature < 0 or (req.temperature == 0 and req.samples > 1):
        raise ValueError(f"--temperature must be > 0 for several samples (0 is greedy: K identical samples), got {req.temperature}")
    arith = req.arith or req.policy.arith or default_arith()
    problems = load_benchmarks(req.benchmarks, req.limit, req.data_dir, arith)
    model_path = resolve_model(req.policy.model)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except OSError as e:
        raise FileNotFoundError(f"cannot load model {req.policy.model!r} ({model_path}): {e}") from None
    prompt_format = req.prompt_format or req.policy.prompt_format
    longest = max(len(p.prompt_ids) for ps in problems.values() for p in _prompts(ps, tokenizer, prompt_format))
    req.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(req.device).split(":")[0]
    dtype, _ = resolve_dtype(req.policy.dtype, device)  # auto: bfloat16 where native, else float32

    start = time.perf_counter()
    sampler = Sampler(
        EngineSpec(
            model_path=model_path,
            device=device,
            dtype=dtype,
            lora_rank=req.policy.adapter_rank or None,
            kv_cache_gib=req.kv_cache_gib,
            gpu_memory_utilization=req.gpu_memory_utilization,
            max_model_len=longest + req.max_tokens,
            max_num_seqs=req.max_num_seqs,
            seed=req.seed,
        )
    )
    try:
        if req.policy.adapter is not None:
            adapter = req.policy.adapter
            sampler.load_adapter(lambda path: shutil.copytree(adapter, path), version=0)
        elif req.policy.weights is not None:
            import torch

            weights = torch.load(req.policy.weights, map_location="cpu", weights_only=True)
            sampler.load_weights(weights.items(), version=0)
        runtime = {"engine_ready_s": time.perf_counter() - start}
        settings = {
            "model": req.policy.model,
            "model_path": model_path,
            "policy": req.policy.label,
            "dtype": dtype,
            "reward_policy": rewards.describe_policy(req.reward_policy),
            "adapter_rank": req.policy.adapter_rank,
            "full_weights": req.policy.weights is not None,
            "benchmarks": list(req.benchmarks),
            "limit": req.limit,
            "data_dir": req.data_dir,
            "seed": req.seed,
            "device": device,
            "prompt_format": prompt_format,
            **({"arith_max": arith.max_operand, "arith_terms": arith.terms} if any(b in SYNTHETIC_BENCHMARKS for b in req.benchmarks) else {}),
        }
        return evaluate_problems(
            sampler,
            problems,
            req.samples,
            req.temperature,
            req.max_tokens,
            req.out,
            settings,
            progress,
            runtime,
            prompt_format=prompt_format,
            reward_policy=req.reward_policy,
        )
    finally:
        sampler.close()
