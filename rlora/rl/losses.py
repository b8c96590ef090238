"""Policy-gradient losses with an importance-sampling correction.

The sampler (vLLM) and the learner never compute exactly the same probabilities (different
kernels, precision, and a policy that may lag), so each token's gradient is weighted by
w = p_learner / p_sampler, computed from the rollout's own sampler logprobs. The blog's objective

    loss = -(1/N) * sum over completion tokens of (p_learner / p_sampler) * advantage

has gradient -(1/N) * sum w * A * grad log p_learner. Each function below returns the per-token
terms (N,) whose sum divided by N is the loss; they are pure functions of
(learner logprobs, sampler logprobs, advantages) and differ only in the weight w:

- `is`: w = p_learner / p_sampler, untruncated (the blog's objective as written).
- `tis`: truncated importance sampling (Ionides 2008; used for RL with vLLM sampling by Yao et
  al. 2025 and verl's `tis`): w is detached and capped at C. A rare token on which the sampler
  and learner disagree cannot then dominate the batch; the estimator is biased towards w = C
  on those tokens and unbiased elsewhere. The loss value reported is sum min(w, C) * A / N.
- `reinforce`: w = 1 (plain on-policy REINFORCE with centred advantages; the reference the tests
  compare the others against).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def importance_sampling(learner_lp_N: torch.Tensor, sampler_lp_N: torch.Tensor, adv_N: torch.Tensor, cap: float) -> torch.Tensor:
    return -torch.exp(learner_lp_N - sampler_lp_N) * adv_N


def truncated_importance_sampling(learner_lp_N: torch.Tensor, sampler_lp_N: torch.Tensor, adv_N: torch.Tensor, cap: float) -> torch.Tensor:
    w_N = torch.exp(learner_lp_N.detach() - sampler_lp_N).clamp(max=cap)
    # exp(lp - sg(lp)) is 1 in value and has gradient grad lp: value w*A, gradient w*A*grad lp.
    return -w_N * torch.exp(learner_lp_N - learner_lp_N.detach()) * adv_N


def reinforce(learner_lp_N: torch.Tensor, sampler_lp_N: torch.Tensor, adv_N: torch.Tensor, cap: float) -> torch.Tensor:
    return -learner_lp_N * adv_N


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
LOSSES: dict[str, LossFn] = {
    "is": importance_sampling,
    "tis": truncated_importance_sampling,
    "reinforce": reinforce,
}


def tokens_norm(num_tokens: int, constant: float) -> float:
    """N = completion tokens in the step's batch (every token weighs the same)."""
    return float(max(num_tokens, 1))


def constant_norm(num_tokens: int, constant: float) -> float:
    """N fixed for the run (Dr. GRPO style): long and short batches are not rescaled."""
    return float(constant)


NORMALIZERS: dict[str, Callable[[int, float], float]] = {
    "tokens": tokens_norm,
    "constant": constant_norm,
}


def ratio_stats(learner_lp_N: torch.Tensor, sampler_lp_N: torch.Tensor, cap: float) -> dict[str, float]:
    """What could silently go wrong between sampler and learner, measured on every batch."""
    with torch.no_grad():
        log_ratio_N = learner_lp_N - sampler_lp_N
        ratio_N = torch.exp(log_ratio_N)
        return {
            "ratio_mean": ratio_N.mean().item(),
            "ratio_max": ratio_N.max().item(),
            "truncated_frac": (ratio_N > cap).float().mean().item(),
            # k3 estimator of KL(sampler || learner) on the sampler's own tokens: r - 1 - log r >= 0
            "kl_sample_train": (ratio_N - 1 - log_ratio_N).mean().item(),
        }
