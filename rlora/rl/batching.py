"""Groups -> TrainBatch: centre rewards, drop groups with no signal, pad and align tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from rlora.rl.types import Group, TrainBatch


def build_batch(groups: Sequence[Group], advantage_fn: Callable[[torch.Tensor], torch.Tensor], pad_id: int) -> TrainBatch | None:
    """One row per rollout of every group with mixed rewards; None when no group has signal.

    Row b holds prompt + completion; targets are the tokens shifted left by one, so the loss at
    position t scores token t+1. Only completion targets are on the mask, and the sampler's
    logprob of each completion token sits at the same position as its target.
    """
    rows: list[tuple[tuple[int, ...], int, tuple[float, ...], float]] = []
    for group in groups:
        if not group.has_signal:
            continue
        adv_G = advantage_fn(torch.tensor(group.rewards_G, dtype=torch.float32))
        for rollout, adv in zip(group.rollouts, adv_G.tolist()):
            assert len(rollout.sampler_logprobs) == len(rollout.completion_ids), "rollout logprobs misaligned"
            if not rollout.completion_ids:
                continue
            rows.append((rollout.prompt_ids + rollout.completion_ids, len(rollout.prompt_ids), rollout.sampler_logprobs, adv))
    if not rows:
        return None
    rows.sort(key=lambda r: -len(r[0]))  # similar lengths share micro-batches: less padding
    B, T = len(rows), max(len(r[0]) for r in rows)
    tokens_B_T = torch.full((B, T), pad_id, dtype=torch.int64)
    targets_B_T = torch.full((B, T), pad_id, dtype=torch.int64)
    mask_B_T = torch.zeros((B, T), dtype=torch.float32)
    sampler_lp_B_T = torch.zeros((B, T), dtype=torch.float32)
    for b, (ids, n_prompt, lps, _) in enumerate(rows):
        n = len(ids)
        tokens_B_T[b, :n] = torch.tensor(ids)
        targets_B_T[b, : n - 1] = torch.tensor(ids[1:])
        # completion token j sits at position n_prompt + j, predicted from position n_prompt + j - 1
        mask_B_T[b, n_prompt - 1 : n - 1] = 1.0
        sampler_lp_B_T[b, n_prompt - 1 : n - 1] = torch.tensor(lps)
    return TrainBatch(
        tokens_B_T=tokens_B_T,
        targets_B_T=targets_B_T,
        mask_B_T=mask_B_T,
        sampler_logprobs_B_T=sampler_lp_B_T,
        advantages_B=torch.tensor([r[3] for r in rows], dtype=torch.float32),
        lengths_B=torch.tensor([len(r[0]) for r in rows], dtype=torch.int64),
    )
