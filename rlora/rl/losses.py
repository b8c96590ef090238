"""Policy-gradient losses with an importance-sampling correction, and an optional KL penalty.

The sampler (vLLM) and the learner never compute exactly the same probabilities (different
kernels, precision, and a policy that may lag by a few steps when sampling runs ahead), so each
token's gradient is weighted by w = p_learner / p_sampler, computed from the rollout's own
sampler logprobs: the sampler is the behaviour policy. The blog's objective

    loss = -(1/N) * sum over completion tokens of (p_learner / p_sampler) * advantage

has gradient -(1/N) * sum w * A * grad log p_learner. Each function in `LOSSES` takes one
micro-batch's completion tokens as `LossInputs` (N,) and the run's `LossSpec`, and returns the
per-token terms (N,) whose sum divided by N is the loss, with per-token flags for the statistics
(`masked_N`, `clipped_N`). Write r_t = p_learner(t) / p_sampler(t), sg = stop-gradient:

- `is`: w = r, untruncated (the blog's objective as written).
- `tis`: truncated importance sampling (Ionides 2008; used for RL with vLLM sampling by Yao et
  al. 2025 and verl's `tis`): w = min(sg(r), C). A rare token on which the sampler and learner
  disagree cannot then dominate the batch; the estimator is biased towards w = C on those tokens
  and unbiased elsewhere. The loss value reported is sum min(r, C) * A / N.
- `reinforce`: w = 1 (plain on-policy REINFORCE with centred advantages; the reference the tests
  compare the others against).
- `seq_mask`: sequence-level masked importance sampling (verl's rollout-correction sequence
  rejection, DeepSeek-V3.2's and TRL's off-policy sequence mask). A sequence s whose mean
  log-ratio m_s = (1/|s|) sum_{t in s} log sg(r_t) (the log of its geometric-mean ratio) leaves
  [-delta, +delta] is dropped: its terms are 0. Kept sequences use the `tis` weight min(sg(r), C).
  N still counts the dropped tokens (N is fixed before the forward, so micro-batches and ranks
  add up): a dropped sequence shrinks the step instead of re-weighting the kept ones.
  `masked_N` flags the dropped tokens.
- `ppo_clip`: PPO's clipped surrogate with the sampler as the behaviour policy (tinker-cookbook's
  "ppo"): term = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A), r differentiable. At r = 1
  it equals `is`; once a token's ratio has moved past the clip in the direction its advantage
  pushes, its gradient is 0. `clipped_N` flags those tokens (the clipped branch is strictly smaller).

KL penalty toward the reference policy (`LossSpec.kl_coef` > 0; the reference is the initial
policy: LoRA with its adapter switched off, or FullFT's frozen initial weights). `objective`
adds to every token's term, masked or clipped alike,

    kl_coef * k3,   k3 = exp(d) - d - 1,   d = log p_ref - log p_learner   (Schulman's k3)

an unbiased, non-negative estimate of KL(learner || ref) on tokens sampled from the learner
(here from the sampler, which is the learner up to numerics and staleness), differentiable
through log p_learner: d k3 / d log p_learner = 1 - p_ref / p_learner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class LossSpec:
    """What the learner minimises: which loss, its constants, the KL penalty, and the temperature
    at which the learner scores tokens (the sampler's, so both score the same distribution)."""

    loss: str = "tis"  # key of LOSSES
    cap: float = 2.0  # C: the truncation of the IS weight (tis, seq_mask)
    seq_mask_delta: float = 0.5  # seq_mask: the band [-delta, delta] of a kept sequence's mean log-ratio
    clip_eps_low: float = 0.2  # ppo_clip: r is clipped to [1 - eps_low, 1 + eps_high]
    clip_eps_high: float = 0.2
    kl_coef: float = 0.0  # 0: no penalty, and no reference forward at all
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"LossSpec.loss {self.loss!r} is not one of {sorted(LOSSES)}")


@dataclass(frozen=True, kw_only=True)
class LossInputs:
    """One micro-batch's completion tokens, flattened in row order (N tokens of S sequences)."""

    learner_lp_N: torch.Tensor  # (N,) log p_learner, differentiable
    sampler_lp_N: torch.Tensor  # (N,) log p_sampler of the same tokens
    adv_N: torch.Tensor  # (N,) the advantage of each token's sequence
    seq_id_N: torch.Tensor  # (N,) int64 in [0, S): which sequence each token belongs to
    num_seqs: int  # S
    ref_lp_N: torch.Tensor | None = None  # (N,) log p_ref, no gradient; only when the spec's kl_coef > 0


@dataclass(frozen=True)
class LossTerms:
    """A loss's per-token terms (sum / N is the loss) and what it did to each token."""

    terms_N: torch.Tensor  # (N,)
    masked_N: torch.Tensor  # (N,) bool: the token's sequence was dropped (seq_mask)
    clipped_N: torch.Tensor  # (N,) bool: the token's ratio was clipped, its gradient is 0 (ppo_clip)
    kl_ref_N: torch.Tensor | None = None  # (N,) k3 toward the reference, detached; set by `objective` when kl_coef > 0


def _none_N(x: LossInputs) -> torch.Tensor:
    return torch.zeros_like(x.learner_lp_N, dtype=torch.bool)


def _truncated_is_terms(x: LossInputs, cap: float) -> torch.Tensor:
    w_N = torch.exp(x.learner_lp_N.detach() - x.sampler_lp_N).clamp(max=cap)
    # exp(lp - sg(lp)) is 1 in value and has gradient grad lp: value w*A, gradient w*A*grad lp.
    return -w_N * torch.exp(x.learner_lp_N - x.learner_lp_N.detach()) * x.adv_N


def importance_sampling(x: LossInputs, spec: LossSpec) -> LossTerms:
    return LossTerms(-torch.exp(x.learner_lp_N - x.sampler_lp_N) * x.adv_N, _none_N(x), _none_N(x))


def truncated_importance_sampling(x: LossInputs, spec: LossSpec) -> LossTerms:
    return LossTerms(_truncated_is_terms(x, spec.cap), _none_N(x), _none_N(x))


def reinforce(x: LossInputs, spec: LossSpec) -> LossTerms:
    return LossTerms(-x.learner_lp_N * x.adv_N, _none_N(x), _none_N(x))


def sequence_mask(x: LossInputs, spec: LossSpec) -> LossTerms:
    log_ratio_N = x.learner_lp_N.detach() - x.sampler_lp_N
    sums_S = torch.zeros(x.num_seqs, dtype=log_ratio_N.dtype, device=log_ratio_N.device).index_add_(0, x.seq_id_N, log_ratio_N)
    counts_S = torch.zeros_like(sums_S).index_add_(0, x.seq_id_N, torch.ones_like(log_ratio_N))
    mean_S = sums_S / counts_S.clamp(min=1)
    masked_N = (mean_S.abs() > spec.seq_mask_delta)[x.seq_id_N]
    return LossTerms(_truncated_is_terms(x, spec.cap) * (~masked_N), masked_N, _none_N(x))


def ppo_clip(x: LossInputs, spec: LossSpec) -> LossTerms:
    ratio_N = torch.exp(x.learner_lp_N - x.sampler_lp_N)
    unclipped_N = ratio_N * x.adv_N
    clipped_obj_N = ratio_N.clamp(1 - spec.clip_eps_low, 1 + spec.clip_eps_high) * x.adv_N
    return LossTerms(-torch.minimum(unclipped_N, clipped_obj_N), _none_N(x), clipped_obj_N < unclipped_N)


LossFn = Callable[[LossInputs, LossSpec], LossTerms]
LOSSES: dict[str, LossFn] = {
    "is": importance_sampling,
    "tis": truncated_importance_sampling,
    "reinforce": reinforce,
    "seq_mask": sequence_mask,
    "ppo_clip": ppo_clip,
}


def kl_k3(learner_lp_N: torch.Tensor, ref_lp_N: torch.Tensor) -> torch.Tensor:
    """exp(d) - d - 1 with d = ref - learner: >= 0, 0 where they agree, gradient through the learner's logprobs."""
    d_N = ref_lp_N - learner_lp_N
    return torch.exp(d_N) - d_N - 1


def objective(x: LossInputs, spec: LossSpec) -> LossTerms:
    """The spec's loss, plus kl_coef * k3 on every token when kl_coef > 0 (then `x.ref_lp_N` is required)."""
    terms = LOSSES[spec.loss](x, spec)
    if spec.kl_coef == 0:
        return terms
    assert x.ref_lp_N is not None, "kl_coef > 0 needs the reference policy's logprobs"
    kl_N = kl_k3(x.learner_lp_N, x.ref_lp_N)
    return LossTerms(terms.terms_N + spec.kl_coef * kl_N, terms.masked_N, terms.clipped_N, kl_N.detach())


def tokens_norm(num_tokens: int, constant: float) -> float:
    """N = completion tokens in the optimizer step's (mini)batch (every token weighs the same)."""
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


def staleness_ratio_stats(learner_lp_N: torch.Tensor, sampler_lp_N: torch.Tensor, staleness_N: torch.Tensor) -> dict[str, float]:
    """`ratio_mean_s{k}` and `kl_sample_train_s{k}` over the tokens sampled k policy versions ago, for each k present."""
    out: dict[str, float] = {}
    with torch.no_grad():
        for k in sorted(set(staleness_N.tolist())):
            on_N = staleness_N == k
            log_ratio_N = learner_lp_N[on_N] - sampler_lp_N[on_N]
            ratio_N = torch.exp(log_ratio_N)
            out[f"ratio_mean_s{k}"] = ratio_N.mean().item()
            out[f"kl_sample_train_s{k}"] = (ratio_N - 1 - log_ratio_N).mean().item()
    return out
