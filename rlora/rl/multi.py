"""Multi-tenant LoRA RL: K runs against ONE vLLM engine and ONE frozen base in one process.

`rlora rl-multi --config FILE` trains K LoRA runs that differ in rank, alpha, learning rate,
seed (anything but the keys in `SHARED_KEYS`) side by side. Each step:
  1. problems   each run's P problems (its own seed), exactly as `rlora.rl.loop` picks them
  2. sample     ONE `generate` call with every run's prompts, each request tagged with its run's
                live adapter (the engine holds K adapters: `max_loras=K`)
  3-6.          per run, `rlora.rl.loop`'s own stages: grade, learn (its own learner and optimizer),
  7. hand off   and `publish`, which proves with the run's own probe, and with the fingerprints of
                the slot that holds the run's adapter on every worker, that the engine now serves
                that run's new adapter (and no other tenant's)
then every run logs its row and checkpoints, each in its own run directory, in the single-run
format (`config.json`, `metrics.jsonl` with the keys of `rlora.rl.loop`, `checkpoints/`).

Same results as alone. The learners share one frozen base: each run's model is a copy of the
module tree whose base tensors ARE the first model's (no second copy in memory), with the run's
own adapter applied exactly as `rlora.train.learner.load_policy` applies it, so run k takes exactly the
update a single-run `Learner` with its seed would take on the same batch (tests/test_multi.py
checks this bit for bit). Sampling differs from a lone run only by noise: the runs share the
engine's seed (the first run's seed + the first step, like a single run), and a request's tokens
depend on what else is in the batch only through floating-point order. Mixed batches of several
adapters are correct only with rlora's CPU LoRA ops (`rlora.engine.vllm_lora_ops`); see the Sampler.

File format (YAML, like a sweep file, `kind` implied):

    base: configs/rl_cpu_demo_lora_r1.yaml    # optional flat RL preset (relative to the cwd, else this file)
    out: runs/rl_multi_cpu                    # optional; default runs/<file stem>
    fixed: {max_steps: 20}                    # optional: the same override for every run
    runs:                                     # one mapping of overrides per run ...
      - {rank: 1, lr: 1.0e-3}
      - {rank: 8, lr: 3.0e-4, seed: 1}
    # ... or grid: {rank: [1, 8], lr: [3.0e-4, 1.0e-3]}   (rlora.experiments.sweep's grid, a product)

Runs are named and checked by `rlora.experiments.sweep` (`<out>/rank=8,lr=0.0003,seed=1/`); `sweep.json` in
`out` lists them, so `rlora analyze OUT` reads a multi-run like a sweep. Every run must be LoRA,
and the keys of `SHARED_KEYS` must agree across runs (one engine samples for all, one base model
serves every learner): a difference is a ConfigError naming the key and the run. Periodic
evaluation is not supported (`eval_every` must be 0); evaluate checkpoints with `rlora eval --run`.

Resume. `rlora rl-multi --config FILE` again, or `--resume OUT [key=value ...]` (e.g.
`max_steps=40` to go on; the overrides are saved in every run's config.json), continues every run
from its own last checkpoint. Runs advance in lockstep: normally they all checkpoint together, but
a kill between two runs' checkpoints leaves some a checkpoint ahead; on resume those wait (no
prompts in the shared call, no update) until the others reach their step, after which all move
together again. A run may also have a smaller `max_steps` and stop early. Older checkpoints keep
no optimizer state, so rolling the runs ahead back is not an option.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm import tqdm

import rewards
from rlora.config import ConfigError, RLConfig, parse_overrides
from rlora.data import Problem, batch_for_step, load_task, make_prompt
from rlora.devices import resolve_device, resolve_precision
from rlora.engine.sampler import EngineSpec, Sampler
from rlora.experiments.sweep import SWEEP_FILE, Point, Sweep, check_same_config, parse_sweep, write_sweep_record
from rlora.plan import check_before_loading
from rlora.rl.handoff import Probe, make_probe, publish
from rlora.rl.steps import learn, reward_group, step_metrics
from rlora.runs import RunDir, create_run, reopen_run
from rlora.train import lora
from rlora.train.distributed import World
from rlora.train.learner import DTYPES, Learner, LearnerSpec, load_policy
from rlora.train.models import resolve_model
from rlora.train.placement import Placement, placement_for
from rlora.train.setup import learner_spec, restore, save_if_due, seed_everything

MULTI_KEYS = ("base", "out", "fixed", "runs", "grid")
# One engine samples for every run (model, precision, memory, and one SamplingParams for the
# whole call) and one frozen base serves every learner (model, dtype, device).
# rl-multi runs the engine and every learner in this one process (no torchrun, no split placement).
ONE_PROCESS = {"placement": "colocate", "tensor_parallel_size": 1}
SHARED_KEYS = (
    "model",
    "dtype",
    "device",
    "kv_cache_gib",
    "gpu_memory_utilization",
    "max_model_len",
    "group_size",
    "max_tokens",
    "temperature",
    "placement",
    "tensor_parallel_size",
)


# ------------------------------------------------------------------------------------ the file


def runs_as_grid(runs: object, where: str) -> list[dict[str, list[object]]]:
    """`runs: [{rank: 1}, ...]` as a list of one-point sweep grids, so rlora.experiments.sweep checks and names them."""
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"'runs'{where} must be a non-empty list of mappings of config overrides, got {runs!r}")
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or not run or any(isinstance(v, (list, dict)) for v in run.values()):
            raise ConfigError(f"run {i}{where} must be a non-empty mapping of config key: value, got {run!r}")
    return [{key: [value] for key, value in run.items()} for run in runs]


def check_runs(configs: Sequence[tuple[str, RLConfig]], where: str = "") -> None:
    """Every run LoRA, without periodic eval, in one process; the shared keys equal across runs."""
    for name, cfg in configs:
        if cfg.is_full:
            raise ConfigError(f"run {name!r}{where} has rank=full: rl-multi trains LoRA runs on one shared base; train FullFT with `rlora rl`")
        if cfg.eval_every:
            raise ConfigError(f"run {name!r}{where} has eval_every={cfg.eval_every}: rl-multi has no periodic eval; use `rlora eval --run` on its checkpoints")
        if cfg.max_staleness:
            raise ConfigError(
                f"run {name!r}{where} has max_staleness={cfg.max_staleness}: rl-multi steps its tenants in turn (synchronous); use `rlora rl` for asynchronous RL"
            )
        for key, value in ONE_PROCESS.items():
            if getattr(cfg, key, value) != value:
                raise ConfigError(f"run {name!r}{where} has {key}={getattr(cfg, key)!r}: rl-multi runs engine and learners in one process ({key}={value!r})")
    first_name, first = configs[0]
    for key in SHARED_KEYS:
        for name, cfg in configs[1:]:
            if getattr(cfg, key) != getattr(first, key):
                raise ConfigError(
                    f"config key {key!r} must be the same for every run{where} (one engine and one base model serve them all): "
                    f"run {name!r} has {getattr(cfg, key)!r}, run {first_name!r} has {getattr(first, key)!r}"
                )


def load_multi(path: str | Path, out: str | Path | None = None, overrides: dict[str, object] | None = None) -> Sweep:
    """Read and check a multi-run file; `overrides` join its `fixed`. Errors name the key, run and file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"multi-run file {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    where = f" in {path}"
    if not isinstance(spec, dict) or not set(spec) <= set(MULTI_KEYS):
        extra = sorted(set(spec) - set(MULTI_KEYS)) if isinstance(spec, dict) else spec
        raise ConfigError(f"multi-run file {path} must be a mapping of the keys {', '.join(MULTI_KEYS)}; unknown: {extra!r}")
    if ("runs" in spec) == ("grid" in spec):
        raise ConfigError(f"multi-run file {path} needs exactly one of 'runs' (a list) or 'grid' (a sweep grid)")
    grid = spec["grid"] if "grid" in spec else runs_as_grid(spec["runs"], where)
    fixed = spec.get("fixed") or {}
    if overrides and isinstance(fixed, dict):
        fixed = {**fixed, **overrides}
    sweep = parse_sweep({**{k: spec[k] for k in ("base", "out") if k in spec}, "kind": "rl", "fixed": fixed, "grid": grid}, path, out)
    if "runs" in spec and len(sweep.points) < len(spec["runs"]):
        raise ConfigError(f"two runs{where} have the same overrides; each run must differ (names: {[p.name for p in sweep.points]})")
    check_runs([(p.name, p.config) for p in sweep.points], where)  # type: ignore[misc]
    return sweep


# ------------------------------------------------------------------------------------ learners


def share_base(base: nn.Module, spec: LearnerSpec) -> nn.Module:
    """A copy of `base`'s module tree holding base's own tensors (no memory), with spec's adapter applied.

    The adapter is drawn as `load_policy` draws it (a generator seeded with spec.seed, on the
    frozen base in compute precision), so the model equals a single run's bit for bit.
    """
    shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    model = copy.deepcopy(base, memo=shared)
    assert spec.lora is not None, "only LoRA learners can share a frozen base"
    lora.apply_lora(model, spec.lora, generator=torch.Generator().manual_seed(spec.seed))
    return model.to(spec.device)


def shared_base_learners(specs: Sequence[LearnerSpec]) -> list[Learner]:
    """K LoRA learners (K adapters, K optimizers) over ONE frozen base loaded once."""
    first = specs[0]
    for spec in specs:
        assert spec.lora is not None, "only LoRA learners can share a frozen base"
        assert (spec.model_path, spec.dtype, spec.device) == (first.model_path, first.dtype, first.device), "learners differ in their base"
    base = load_policy(replace(first, lora=None)).to(DTYPES[first.dtype]).requires_grad_(False)
    return [Learner(spec, share_base(base, spec)) for spec in specs]


# ------------------------------------------------------------------------------------ the loop


@dataclass(frozen=True, kw_only=True)
class Tenant:
    """One run of a multi-run: what it learns with, where it writes, and the step it resumes at."""

    slot: str  # its adapter's tenant name in the engine
    cfg: RLConfig
    run: RunDir
    learner: Learner
    problems: list[Problem]
    probe: Probe  # its own handoff probe (remembers its previous policy)
    start_step: int  # the step after its last checkpoint

    def active(self, step: int) -> bool:
        return self.start_step <= step < self.cfg.max_steps


def multi_step(sampler: Sampler, tenants: Sequence[Tenant], step: int) -> list[dict[str, object]]:
    """One lockstep step of the given runs: one shared sampling call, then each run's own stages; their rows.

    sample_s and step_s are the whole set's (one call, one step); grade_s, learn_s and the
    handoff keys are the run's own.
    """
    t0 = time.perf_counter()
    prompts_K_P = [
        [make_prompt(p, sampler.tokenizer, t.cfg.prompt_format) for p in batch_for_step(t.problems, step, t.cfg.prompts_per_step, t.cfg.seed)] for t in tenants
    ]
    shared = tenants[0].cfg  # group_size, max_tokens, temperature are SHARED_KEYS
    slots = [t.slot for t, prompts_P in zip(tenants, prompts_K_P) for _ in prompts_P]
    samples_N_G = sampler.sample([p for prompts_P in prompts_K_P for p in prompts_P], shared.group_size, shared.max_tokens, shared.temperature, slots)
    sample_s = time.perf_counter() - t0
    rows: list[dict[str, object]] = []
    offsets = itertools.accumulate((len(p) for p in prompts_K_P), initial=0)
    for tenant, prompts_P, start in zip(tenants, prompts_K_P, offsets):
        slot = sampler.slot(tenant.slot)
        t1 = time.perf_counter()
        groups_P = [reward_group(p, s, slot.version, tenant.cfg.reward_policy) for p, s in zip(prompts_P, samples_N_G[start : start + len(prompts_P)])]
        t2 = time.perf_counter()
        assert all(g.policy_version == step for g in groups_P), f"run {tenant.run.path}: rollouts must come from its current policy"
        stats, train_tokens = learn(tenant.learner, groups_P, tenant.cfg, sampler.tokenizer.pad_token_id or 0)
        t3 = time.perf_counter()
        handoff = publish(tenant.learner, slot, step + 1, tenant.probe)
        row = {**step_metrics(step, groups_P, stats, train_tokens), "sample_s": sample_s, "grade_s": t2 - t1, "learn_s": t3 - t2, **handoff}
        rows.append({**row, "handoff_bytes": sampler.handoff_bytes})
    step_s = time.perf_counter() - t0
    return [{**row, "step_s": step_s} for row in rows]


def multi_engine_spec(cfgs: Sequence[RLConfig], model_path: str, device: str, place: Placement, start_step: int) -> EngineSpec:
    """The one engine of K LoRA runs, on the GPUs `place` gives it (vLLM `device_ids`)."""
    first = cfgs[0]
    return EngineSpec(
        model_path=model_path,
        device=device.split(":")[0],
        dtype=first.dtype,
        lora_rank=max(int(cfg.rank) for cfg in cfgs),
        kv_cache_gib=first.kv_cache_gib,
        gpu_memory_utilization=first.gpu_memory_utilization,
        max_model_len=first.max_model_len,
        max_num_seqs=max(256, sum(cfg.prompts_per_step for cfg in cfgs) * first.group_size),
        seed=first.seed + start_step,
        max_loras=len(cfgs),
        device_ids=place.sampler_gpus,
        tensor_parallel_size=first.tensor_parallel_size,
        in_process=place.engine_in_process,
        cpu_threads_bind=place.cpu_threads_bind,
    )


def train_multi(runs: Sequence[tuple[RLConfig, RunDir]], progress: bool = True) -> list[RunDir]:
    """Train every run to its max_steps in lockstep on one engine; each resumes from its own last checkpoint."""
    check_runs([(str(run.path), cfg) for cfg, run in runs])
    with ExitStack() as stack:
        for _, run in runs:  # a second rl-multi on the same runs must not train them twice at once
            if not stack.enter_context(run.claim()):
                raise RuntimeError(f"run {run.path} is being trained by another process")
        return _train_claimed(runs, progress)


def _train_claimed(runs: Sequence[tuple[RLConfig, RunDir]], progress: bool) -> list[RunDir]:
    wall_start = time.time()
    cfgs = [resolve_precision(cfg) for cfg, _ in runs]
    first = cfgs[0]
    seed_everything(first.seed)
    device = resolve_device(first.device)
    # one base and one engine; learners step one after another: the largest micro-batch bounds the peak
    check_before_loading(max(cfgs, key=lambda c: c.micro_batch * c.max_tokens), device, 1)
    place = placement_for(first, device, World())  # one process: `device: cuda:N` puts learners AND engine on GPU N
    model_path = resolve_model(first.model)
    learners = shared_base_learners([learner_spec(cfg, model_path, place.learner_device) for cfg in cfgs])
    starts = [restore(run, learner) for (_, run), learner in zip(runs, learners)]
    for cfg, (_, run) in zip(cfgs, runs):
        run.record({"reward_policy": rewards.describe_policy(cfg.reward_policy), "dtype": cfg.dtype})
    sampler = Sampler(multi_engine_spec(cfgs, model_path, device, place, min(starts)))
    tenants = [
        Tenant(
            slot=f"run{k}",
            cfg=cfg,
            run=run,
            learner=learner,
            problems=load_task(cfg.task, cfg.train_data, cfg.arith_max, cfg.seed, cfg.arith_terms),
            probe=make_probe(sampler.tokenizer, cfg.dtype, cfg.probe_tol, cfg.prompt_format),
            start_step=start,
        )
        for k, (cfg, (_, run), learner, start) in enumerate(zip(cfgs, runs, learners, starts))
    ]
    for tenant in tenants:
        publish(tenant.learner, sampler.slot(tenant.slot), tenant.start_step, tenant.probe)

    end = max(cfg.max_steps for cfg in cfgs)
    bar = tqdm(range(min(starts), end), initial=min(starts), total=end, desc=f"rl-multi x{len(tenants)}", disable=not progress)
    for step in bar:
        active = [t for t in tenants if t.active(step)]
        if not active:  # the runs still ahead wait for runs that have already finished: nothing to do
            continue
        rows = multi_step(sampler, active, step)
        for tenant, row in zip(active, rows):
            tenant.run.log(row)
            save_if_due(tenant.run, tenant.cfg, tenant.learner, step + 1)
        bar.set_postfix(reward="/".join(f"{row['reward_mean']:.2f}" for row in rows))
    sampler.close()
    for tenant in tenants:
        tenant.run.close()
        tenant.run.mark_done(time.time() - wall_start, resumed=tenant.start_step > 0)
    return [run for _, run in runs]


# ------------------------------------------------------------------------------------ entry points


def open_run(point: Point) -> tuple[RLConfig, RunDir]:
    """A new run directory for the point, or its existing one if its config.json matches the file."""
    cfg = point.config
    assert isinstance(cfg, RLConfig)
    cfg = resolve_precision(cfg)  # config.json records the dtype the run uses, not "auto"
    if RunDir(Path(cfg.run_dir)).status() == "new":
        return cfg, create_run(cfg, point.name, "rl")
    check_same_config(point, Path(cfg.run_dir))
    return reopen_run(RLConfig, cfg.run_dir)


def run_multi(path: str | Path, out: str | Path | None = None, overrides: dict[str, object] | None = None, progress: bool = True) -> list[RunDir]:
    """Start (or continue) every run of a multi-run file."""
    multi = load_multi(path, out, overrides)
    write_sweep_record(multi)  # sweep.json: the run names for `--resume OUT` and `rlora analyze OUT`
    return train_multi([open_run(point) for point in multi.points], progress)


def resume_multi(out: str | Path, overrides: dict[str, object] | None = None, progress: bool = True) -> list[RunDir]:
    """Continue every run under `out` (as listed in its sweep.json), overrides applied to each."""
    record = Path(out) / SWEEP_FILE
    if not record.exists():
        raise FileNotFoundError(f"{record} does not exist: not a multi-run directory")
    names = json.loads(record.read_text())["runs"]
    return train_multi([reopen_run(RLConfig, Path(out) / name, overrides) for name in names], progress)


def cmd_rl_multi(args: argparse.Namespace) -> None:
    """`rlora rl-multi` (registered in rlora.cli): prints every run directory."""
    if bool(args.config) == bool(args.resume):
        raise SystemExit("rlora rl-multi: give --config FILE or --resume OUT")
    overrides = parse_overrides(args.overrides)
    runs = resume_multi(args.resume, overrides) if args.resume else run_multi(args.config, args.out, overrides)
    for run in runs:
        print(run.path)
