"""Policy-gradient RL on math with LoRA (rank 1 upward) or full fine-tuning, as in LoRA Without Regret.

One step, top to bottom:
  1. problems   P problems for this step (a pure function of step and seed, so resumes see the same data)
  2. sample     G completions each from the sampler (vLLM), with the sampler's own token logprobs
  3. grade      reward = rewards.grade(completion, gold, task): 1 or 0
  4. centre     advantage = reward - mean reward of the group (GRPO-style, no std division)
  5. batch      groups whose rewards are all equal carry no gradient: counted, then dropped
  6. learn      loss = -(1/N) sum over tokens of w * A, w = p_learner / p_sampler (truncated at C)
  7. hand off   the new adapter (or full weights) goes to the running engine, then a fixed probe
                sequence must score the same under sampler and learner, else the run stops

Departures from the blog: the default loss truncates the importance weight at C = 2 (config
`loss=is` gives the untruncated objective); rollouts are strictly on-policy (one optimizer step
per batch), so w differs from 1 only through sampler/learner numerics, which the run logs as
`kl_sample_train` and `ratio_*` every step.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import rewards
from rlora import distributed, lora
from rlora.advantages import ADVANTAGES
from rlora.batching import build_batch
from rlora.config import ConfigError, RLConfig
from rlora.data import Problem, batch_for_step, load_task
from rlora.evaluate import eval_policy, load_benchmarks, parse_benchmarks
from rlora.learner import Learner, LearnerSpec
from rlora.losses import LOSSES, NORMALIZERS
from rlora.models import resolve_model
from rlora.placement import placement_for
from rlora.runs import RunDir, create_run, reopen_run
from rlora.sampler import AdapterSlot, EngineSpec, Sampler, resolve_device
from rlora.types import Group, Prompt, Rollout, Sample

PROBE_MESSAGES = [
    {"role": "user", "content": "What is 12 + 30? Reply with just the number."},
    {"role": "assistant", "content": "12 + 30 = 42. So the answer is 42."},
]
# Per-token noise between engine and learner on the probe (mean |log p_sampler - log p_learner|):
# float32 on both sides agrees to ~1e-4; bf16 kernels differ by ~0.03-0.07 nats per token, more on
# a sharpened policy (../shared/notes/vllm_cpu.md and our runs). See `publish` for how it is used.
PROBE_NOISE = {"float32": 2e-3, "bfloat16": 0.1, "float16": 0.05}
# The learner's statistics for a step in which no group had mixed rewards (nothing to learn from).
NO_SIGNAL_STATS = {"loss": 0.0, "grad_norm": 0.0, "entropy": float("nan"), "ratio_mean": 1.0, "ratio_max": 1.0, "truncated_frac": 0.0, "kl_sample_train": 0.0}

class HandoffError(RuntimeError):
    """The sampler does not serve the policy the learner just produced."""


# ------------------------------------------------------------------------------------ stages


def make_prompt(problem: Problem, tokenizer: object) -> Prompt:
    text = tokenizer.apply_chat_template([{"role": "user", "content": problem.question}], add_generation_prompt=True, tokenize=False)  # type: ignore[attr-defined]
    ids = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    return Prompt(problem.problem_id, problem.question, tuple(ids), problem.reference, problem.task)


def grade(prompt: Prompt, samples: list[Sample], version: int) -> Group:
    rollouts = tuple(
        Rollout(prompt.prompt_ids, s.completion_ids, s.sampler_logprobs, rewards.grade(s.text, prompt.reference, prompt.task), s.text)
        for s in samples
    )
    return Group(prompt, rollouts, version)


def learn(learner: Learner, groups_P: list[Group], cfg: RLConfig, pad_id: int) -> tuple[dict[str, float], int]:
    """Centre, batch and take one optimizer step: (the learner's statistics, tokens trained on)."""
    batch = build_batch(groups_P, ADVANTAGES[cfg.advantage], pad_id=pad_id)
    if batch is None:  # no group had mixed rewards: nothing to learn from, the policy is unchanged
        return dict(NO_SIGNAL_STATS), 0
    norm_constant = cfg.loss_norm_constant or cfg.prompts_per_step * cfg.group_size * cfg.max_tokens
    norm = NORMALIZERS[cfg.loss_norm](batch.num_tokens, norm_constant)
    return learner.train_step(batch, LOSSES[cfg.loss], norm, cfg.is_cap, cfg.temperature), batch.num_tokens


def step_metrics(step: int, groups_P: list[Group], stats: dict[str, float], train_tokens: int) -> dict[str, object]:
    """A step's metrics row before its timings: rewards, signal, the learner's statistics, token counts."""
    rewards_all = [r for g in groups_P for r in g.rewards_G]
    return {
        "step": step,
        "reward_mean": float(np.mean(rewards_all)),
        "signal_groups": sum(g.has_signal for g in groups_P) / len(groups_P),
        **stats,
        "tokens": sum(len(r.completion_ids) for g in groups_P for r in g.rollouts),
        "train_tokens": train_tokens,
    }


def probe_ids(tokenizer: object) -> list[int]:
    text = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False)  # type: ignore[attr-defined]
    return tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]


@dataclass
class Probe:
    """A fixed sequence scored after every handoff, and the learner's scores of the previous policy."""

    token_ids: list[int]
    noise: float  # expected engine/learner gap from numerics alone (PROBE_NOISE or probe_tol)
    previous_lp: np.ndarray | None = None


def publish(learner: Learner, sampler: Sampler | AdapterSlot, version: int, probe: Probe) -> dict[str, float]:
    """Hand the learner's current policy to the engine and prove that the engine now serves it.

    Two checks on the probe's per-token logprobs: the engine must agree with the learner within
    5x the numeric noise (a wrong or missing adapter is far off), and, whenever the policy moved
    by more than twice the noise since the last handoff, the engine must be closer to the new
    policy than to the previous one (a stale engine is closer to the previous one). In float32
    the first check alone is already tight; in bf16 the second catches staleness that hides
    inside the numeric noise of a single comparison.
    """
    start = time.perf_counter()
    if learner.spec.lora is not None:
        sampler.load_adapter(learner.write_adapter, version)
    else:
        sampler.load_weights(learner.weights(), version)
    handoff_s = time.perf_counter() - start
    sampler_lp = np.array(sampler.prompt_logprobs(probe.token_ids))
    learner_lp = np.array(learner.sequence_logprobs(probe.token_ids))
    gap = float(np.abs(sampler_lp - learner_lp).mean())
    if not gap <= 5 * probe.noise:
        raise HandoffError(
            f"policy v{version}: sampler and learner disagree on the probe by {gap:.4f} nats/token "
            f"(limit {5 * probe.noise:g}); the engine is not serving the learner's weights"
        )
    shift = 0.0
    if probe.previous_lp is not None:
        shift = float(np.abs(learner_lp - probe.previous_lp).mean())
        stale_gap = float(np.abs(sampler_lp - probe.previous_lp).mean())
        if shift > 2 * probe.noise and not gap < stale_gap:
            raise HandoffError(
                f"policy v{version}: the sampler disagrees with the learner by {gap:.4f} nats/token but only by "
                f"{stale_gap:.4f} with the previous policy (which moved {shift:.4f}): the engine serves a stale policy"
            )
    probe.previous_lp = learner_lp
    return {"handoff_s": handoff_s, "probe_gap": gap, "probe_shift": shift, "verify_s": time.perf_counter() - start - handoff_s}


# ------------------------------------------------------------------------------------ setup


def lora_spec(cfg: RLConfig) -> lora.LoRASpec | None:
    if cfg.is_full:
        return None
    targets = lora.TARGETS_ALL_LINEAR if cfg.lora_targets == "all-linear" else tuple(t.strip() for t in cfg.lora_targets.split(","))
    assert isinstance(cfg.rank, int)
    return lora.LoRASpec(cfg.rank, cfg.alpha_rule, cfg.alpha_c, cfg.lora_init, cfg.lora_init_scale, targets)


def learner_spec(cfg: RLConfig, model_path: str, device: str) -> LearnerSpec:
    return LearnerSpec(
        model_path, lora_spec(cfg), cfg.lr, cfg.lr_b_mult, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
        cfg.grad_clip, device, cfg.dtype, cfg.micro_batch, cfg.seed,
    )


def load_latest(run: RunDir, learner: Learner) -> int:
    """Load the run's last checkpoint (if any) into the learner; the next step."""
    start_step = 0
    checkpoint = run.latest_checkpoint()
    if checkpoint is not None:
        start_step, state = RunDir.load_checkpoint(checkpoint)
        learner.load_state(state)
    return start_step


def restore(run: RunDir, learner: Learner) -> int:
    """Load the run's last checkpoint (if any) into the learner; drop metrics rows written after it; the next step."""
    start_step = load_latest(run, learner)
    run.truncate_metrics(start_step)  # drop rows written after the checkpoint by a killed run
    return start_step


def follow_rank0(run: RunDir, learner: Learner) -> RunDir:
    """Learner ranks > 0 (torchrun): the same checkpoint as rank 0, then its step calls until it stops."""
    load_latest(run, learner)
    distributed.follow(learner)  # type: ignore[arg-type]
    distributed.close_world()
    return run


def save_if_due(run: RunDir, cfg: RLConfig, learner: Learner, step: int) -> None:
    """Checkpoint after `step` every `checkpoint_every` steps and after the last one."""
    if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.max_steps):
        extra = {"adapter": learner.write_adapter} if learner.spec.lora is not None else {}
        run.save_checkpoint(step + 1, learner.state(), extra)


def check_choices(cfg: RLConfig) -> None:
    for key, table in (("advantage", ADVANTAGES), ("loss", LOSSES), ("loss_norm", NORMALIZERS), ("alpha_rule", lora.ALPHA_RULES), ("lora_init", lora.INITS),
                       ("learner_parallel", distributed.LEARNERS)):
        if getattr(cfg, key) not in table:
            raise ConfigError(f"config key {key!r} must be one of {sorted(table)}, got {getattr(cfg, key)!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------ the loop


def train(cfg: RLConfig, run: RunDir, progress: bool = True) -> RunDir:
    check_choices(cfg)
    seed_everything(cfg.seed)
    world = distributed.init_world()  # one process, or one of torchrun's (README "Scaling out")
    device = resolve_device(cfg.device)
    place = placement_for(cfg, device, world)
    model_path = resolve_model(cfg.model)
    problems = load_task(cfg.task, cfg.train_data, cfg.arith_max, cfg.seed)
    # periodic eval: one greedy sample per problem (rlora.evaluate.eval_policy); loaded now so a bad name fails first
    eval_sets = load_benchmarks(parse_benchmarks(cfg.eval_benchmarks), cfg.eval_limit, cfg.eval_data_dir) if cfg.eval_every else {}
    learner = distributed.make_learner(learner_spec(cfg, model_path, place.learner_device), cfg.learner_parallel)
    if not world.is_main:
        return follow_rank0(run, learner)
    start_step = restore(run, learner)
    learner = distributed.lead(learner)  # type: ignore[assignment]  # rank 0's handle; the learner itself in one process
    sampler = Sampler(EngineSpec(
        model_path, device.split(":")[0], cfg.dtype, None if cfg.is_full else int(cfg.rank), cfg.kv_cache_gib,
        cfg.gpu_memory_utilization, cfg.max_model_len, max(256, cfg.prompts_per_step * cfg.group_size), cfg.seed + start_step,
        device_ids=place.sampler_gpus, tensor_parallel_size=cfg.tensor_parallel_size, in_process=place.engine_in_process,
        sleep_mode=place.sleep, cpu_threads_bind=place.cpu_threads_bind,
    ))
    tokenizer = sampler.tokenizer
    probe = Probe(probe_ids(tokenizer), cfg.probe_tol or PROBE_NOISE[cfg.dtype])
    publish(learner, sampler, start_step, probe)

    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="rl", disable=not progress, file=sys.stderr)
    for step in bar:
        # policy v{step}, which this step samples from and checkpoint step_{step} holds
        evals = eval_policy(sampler, eval_sets, cfg.max_tokens, run.path / "eval" / f"step_{step:06d}") if eval_sets and step % cfg.eval_every == 0 else {}
        t0 = time.perf_counter()
        prompts_P = [make_prompt(p, tokenizer) for p in batch_for_step(problems, step, cfg.prompts_per_step, cfg.seed)]
        samples_P_G = sampler.sample(prompts_P, cfg.group_size, cfg.max_tokens, cfg.temperature)
        t1 = time.perf_counter()
        groups_P = [grade(p, s, sampler.version) for p, s in zip(prompts_P, samples_P_G)]
        t2 = time.perf_counter()
        assert all(g.policy_version == step for g in groups_P), "rollouts must come from the current policy"
        with sampler.asleep():  # placement=sleep: the engine frees its GPU memory for the learner
            stats, train_tokens = learn(learner, groups_P, cfg, tokenizer.pad_token_id or 0)
        t3 = time.perf_counter()
        handoff = publish(learner, sampler, step + 1, probe)
        timings = {"sample_s": t1 - t0, "grade_s": t2 - t1, "learn_s": t3 - t2, **handoff, "step_s": time.perf_counter() - t0}
        row = {**step_metrics(step, groups_P, stats, train_tokens), **timings, **evals}
        run.log(row)
        save_if_due(run, cfg, learner, step)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", signal=f"{row['signal_groups']:.2f}")
    if eval_sets:  # the final policy (checkpoint step_<max_steps>) gets a row of its own
        run.log({"step": cfg.max_steps, **eval_policy(sampler, eval_sets, cfg.max_tokens, run.path / "eval" / f"step_{cfg.max_steps:06d}")})
    sampler.close()
    distributed.shutdown(learner)  # releases ranks > 0 from follow_rank0
    return run


def run_rl(cfg: RLConfig, name: str = "rl", progress: bool = True) -> RunDir:
    return train(cfg, distributed.from_rank0(lambda: create_run(cfg, name, "rl")), progress)


def resume_rl(run_dir: str | Path, overrides: dict[str, object] | None = None, progress: bool = True) -> RunDir:
    cfg, run = distributed.from_rank0(lambda: reopen_run(RLConfig, run_dir, overrides))
    return train(cfg, run, progress)
