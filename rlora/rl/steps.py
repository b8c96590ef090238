"""The stages of one RL step between the sampler and the learner, as functions over `rlora.rl.types`.

sample (rlora.engine) -> `reward_group` -> `learn` (centre, batch, one optimizer step) -> `step_metrics`.
`rlora.rl.loop` runs them for one policy, `rlora.rl.multi` for K tenants of one engine.
"""

from __future__ import annotations

import numpy as np

import rewards
from rlora.config import RLConfig
from rlora.rl.advantages import ADVANTAGES
from rlora.rl.batching import build_batch
from rlora.rl.losses import LOSSES, NORMALIZERS
from rlora.rl.types import Group, Prompt, Rollout, Sample
from rlora.train.learner import LearnerHandle

# The learner's statistics for a step in which no group had mixed rewards (nothing to learn from).
NO_SIGNAL_STATS = {"loss": 0.0, "grad_norm": 0.0, "entropy": float("nan"), "ratio_mean": 1.0, "ratio_max": 1.0, "truncated_frac": 0.0, "kl_sample_train": 0.0}


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


def learn(learner: LearnerHandle, groups_P: list[Group], cfg: RLConfig, pad_id: int) -> tuple[dict[str, float], int]:
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
        "cut_at_max_tokens": sum(g.cut_at_max_tokens for g in groups_P) / sum(len(g.rollouts) for g in groups_P),
        "tokens": sum(len(r.completion_ids) for g in groups_P for r in g.rollouts),
        "train_tokens": train_tokens,
    }
