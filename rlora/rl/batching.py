"""Groups -> TrainBatch: centre rewards, drop groups with no signal, pad and align tokens; and a
TrainBatch -> minibatches of whole sequences, for several optimizer steps per batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from rlora.rl.types import Group, TrainBatch


def build_batch(
    groups: Sequence[Group], advantage_fn: Callable[[torch.Tensor], torch.Tensor], pad_id: int, current_version: int | None = None
) -> TrainBatch | None:
    """One row per rollout of every group with mixed rewards; None when no group has signal.

    Row b holds prompt + completion; targets are the tokens shifted left by one, so the loss at
    position t scores token t+1. Only completion targets are on the mask, and the sampler's
    logprob of each completion token sits at the same position as its target. A row's staleness
    is `current_version` - its group's policy_version (None: every row 0, the synchronous loop).
    """
    rows: list[tuple[tuple[int, ...], int, tuple[float, ...], float, int]] = []
    for group in groups:
        if not group.has_signal:
            continue
        staleness = 0 if current_version is None else current_version - group.policy_version
        assert staleness >= 0, f"a group sampled by policy v{group.policy_version} is newer than the learner's v{current_version}"
        adv_G = advantage_fn(torch.tensor(group.rewards_G, dtype=torch.float32))
        for rollout, adv in zip(group.rollouts, adv_G.tolist()):
            assert len(rollout.sampler_logprobs) == len(rollout.completion_ids), "rollout logprobs misaligned"
            if not rollout.completion_ids:
                continue
            rows.append((rollout.prompt_ids + rollout.completion_ids, len(rollout.prompt_ids), rollout.sampler_logprobs, adv, staleness))
    if not rows:
        return None
    rows.sort(key=lambda r: -len(r[0]))  # similar lengths share micro-batches: less padding
    B, T = len(rows), max(len(r[0]) for r in rows)
    tokens_B_T = torch.full((B, T), pad_id, dtype=torch.int64)
    targets_B_T = torch.full((B, T), pad_id, dtype=torch.int64)
    mask_B_T = torch.zeros((B, T), dtype=torch.float32)
    sampler_lp_B_T = torch.zeros((B, T), dtype=torch.float32)
    for b, (ids, n_prompt, lps, _, _) in enumerate(rows):
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
        staleness_B=torch.tensor([r[4] for r in rows], dtype=torch.int64),
    )


def select_rows(batch: TrainBatch, rows_b: torch.Tensor) -> TrainBatch:
    """The rows `rows_b` of the batch, longest first again (as `build_batch` leaves them), cropped to the longest."""
    order_b = torch.argsort(batch.lengths_B[rows_b], descending=True, stable=True)
    rows_b = rows_b[order_b]
    T = int(batch.lengths_B[rows_b].max())
    return TrainBatch(
        tokens_B_T=batch.tokens_B_T[rows_b, :T],
        targets_B_T=batch.targets_B_T[rows_b, :T],
        mask_B_T=batch.mask_B_T[rows_b, :T],
        sampler_logprobs_B_T=batch.sampler_logprobs_B_T[rows_b, :T],
        advantages_B=batch.advantages_B[rows_b],
        lengths_B=batch.lengths_B[rows_b],
        staleness_B=batch.staleness_B[rows_b],
    )


def minibatches(batch: TrainBatch, num_minibatches: int, num_substeps: int, rng: np.random.Generator) -> list[TrainBatch]:
    """One minibatch per optimizer step: `num_substeps` passes over the batch, each split into
    `num_minibatches` near-equal sets of whole sequences (at most one per row) in a fresh random order.

    One minibatch per pass is the batch itself, unshuffled: the default (1, 1) is the single step
    of before, bit for bit.
    """
    B = batch.tokens_B_T.shape[0]
    if num_minibatches == 1:
        return [batch] * num_substeps
    out = []
    for _ in range(num_substeps):
        for rows in np.array_split(rng.permutation(B), min(num_minibatches, B)):
            out.append(select_rows(batch, torch.from_numpy(rows).long()))
    return out
