"""Advantages from a group's rewards: GRPO-style centring, as in LoRA Without Regret.

The blog (and tinker-cookbook) use advantage = reward - mean reward of the problem's group,
without dividing by the group's standard deviation; `center_std` (GRPO's original form) is
available but off by default. A group whose rewards are all equal gets all-zero advantages and
carries no gradient: the loop counts such groups and leaves them out of the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def center(rewards_G: torch.Tensor) -> torch.Tensor:
    """reward - group mean."""
    return rewards_G - rewards_G.mean()


def center_std(rewards_G: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(reward - group mean) / (group std + eps), GRPO's original normalisation."""
    return (rewards_G - rewards_G.mean()) / (rewards_G.std(unbiased=False) + eps)


ADVANTAGES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "center": center,
    "center_std": center_std,
}
