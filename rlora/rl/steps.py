"""The stages of one RL step between the sampler and the learner, as functions over `rlora.rl.types`.

sample (rlora.engine) -> `reward_group` -> `learn` (centre, batch, optimizer steps) -> `step_metrics`.
`rlora.rl.loop` runs them for one policy, `rlora.rl.multi` for K tenants of one engine.

`learn` takes num_substeps * num_minibatches optimizer steps on one batch (1 by default, the
blog's on-policy step). After the first, the learner has moved away from the sampler that drew
the rollouts, which the importance ratio r = p_learner / p_sampler sees; `tis` truncates it,
`ppo_clip` clips it, `seq_mask` drops sequences that drifted. Its statistics are those of the
RL step: the mean over its optimizer steps (the max for `*_max` keys), per-staleness keys over
the steps whose minibatch held that staleness.
"""

from __future__ import annotations

import numpy as np

import rewards
from rlora.config import RLConfig
from rlora.rl.advantages import ADVANTAGES
from rlora.rl.batching import build_batch, minibatches
from rlora.rl.losses import NORMALIZERS, LossSpec
from rlora.rl.types import Group, Prompt, Rollout, Sample
from rlora.train.learner import LearnerHandle

# The learner's statistics for a step in which no group had mixed rewards (nothing to learn from).
NO_SIGNAL_STATS = {
    "loss": 0.0,
    "grad_norm": 0.0,
    "entropy": float("nan"),
    "ratio_mean": 1.0,
    "ratio_max": 1.0,
    "truncated_frac": 0.0,
    "kl_sample_train": 0.0,
    "masked_frac": 0.0,
    "clipped_frac": 0.0,
}


def reward_group(prompt: Prompt, samples_G: list[Sample], version: int, reward_policy: str = "default") -> Group:
    """The G samples of one prompt, each scored by `rewards.grade` against the prompt's gold answer."""
    rollouts = tuple(
        Rollout(
            prompt_ids=prompt.prompt_ids,
            completion_ids=s.completion_ids,
            sampler_logprobs=s.sampler_logprobs,
            reward=rewards.grade(s.text, prompt.reference, prompt.reward_task, policy=reward_policy),
            text=s.text,
            finish_reason=s.finish_reason,
        )
        for s in samples_G
    )
    return Group(prompt=prompt, rollouts=rollouts, policy_version=version)


def loss_spec(cfg: RLConfig) -> LossSpec:
    """The objective `cfg` asks for."""
    return LossSpec(
        loss=cfg.loss,
        cap=cfg.is_cap,
        seq_mask_delta=cfg.seq_mask_delta,
        clip_eps_low=cfg.clip_eps,
        clip_eps_high=cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high,
        kl_coef=cfg.kl_coef,
        temperature=cfg.temperature,
    )


def learn(learner: LearnerHandle, groups_P: list[Group], cfg: RLConfig, pad_id: int, current_version: int | None = None) -> tuple[dict[str, float], int]:
    """Centre, batch and take num_substeps * num_minibatches optimizer steps: (the statistics, tokens trained on).

    `current_version`: the learner's policy version before this step; each group's staleness is
    current_version - its policy_version. None: the newest group's version (the synchronous
    loop, where every group comes from the current policy: staleness 0 everywhere).
    """
    version = max(g.policy_version for g in groups_P) if current_version is None else current_version
    staleness = staleness_stats(groups_P, version)
    batch = build_batch(groups_P, ADVANTAGES[cfg.advantage], pad_id=pad_id, current_version=version)
    if batch is None:  # no group had mixed rewards: nothing to learn from, the policy is unchanged
        # kl_ref, like entropy, was not measured (no token was scored): NaN, the column still present
        return {**NO_SIGNAL_STATS, **({"kl_ref": float("nan")} if cfg.kl_coef > 0 else {}), **staleness}, 0
    spec = loss_spec(cfg)
    # N of a minibatch: its own tokens, or the run's constant N shared out over the minibatches
    norm_constant = (cfg.loss_norm_constant or cfg.prompts_per_step * cfg.group_size * cfg.max_tokens) / cfg.num_minibatches
    # a deterministic shuffle per (seed, version): a resumed run splits its batches as the first one did
    rng = np.random.default_rng([cfg.seed, version])
    stats_K = [
        learner.train_step(mb, spec, NORMALIZERS[cfg.loss_norm](mb.num_tokens, norm_constant))
        for mb in minibatches(batch, cfg.num_minibatches, cfg.num_substeps, rng)
    ]
    return {**merge_stats(stats_K), **staleness}, batch.num_tokens


def staleness_stats(groups_P: list[Group], current_version: int) -> dict[str, float]:
    """How many policy versions behind the learner the step's groups were sampled: mean and max over groups."""
    staleness_P = [current_version - g.policy_version for g in groups_P]
    return {"staleness_mean": float(np.mean(staleness_P)), "staleness_max": float(max(staleness_P))}


def merge_stats(stats_K: list[dict[str, float]]) -> dict[str, float]:
    """The K optimizer steps' statistics as one row: the max of `*_max` keys, the mean of the others,
    each over the steps that report it (per-staleness keys appear only where that staleness does)."""
    keys = list(dict.fromkeys(k for stats in stats_K for k in stats))
    merged = {}
    for key in keys:
        values = [stats[key] for stats in stats_K if key in stats]
        merged[key] = max(values) if key.endswith("_max") else sum(values) / len(values)
    return merged


def step_metrics(step: int, groups_P: list[Group], stats: dict[str, float], train_tokens: int) -> dict[str, object]:
    """A step's metrics row before its timings: rewards, signal, the learner's statistics, token counts."""
    rewards_all = [r for g in groups_P for r in g.rewards_G]
    return {
        "step": step,
        "reward_mean": float(np.mean(rewards_all)),
        "signal_groups": sum(g.has_signal for g in groups_P) / len(groups_P),
        **stats,
        "cut_at_max_tokens": sum(g.cut_at_max_tokens for g in groups_P) / sum(len(g.rollouts) for g in groups_P),
        "tokens": sum(len(r.completion_ids) for g in groups_P for r in g.rollouts),
        "train_tokens": train_tokens,
    }
