"""Exact fingerprints of weights, computed the same way by the learner and by every engine worker.

A fingerprint is an order-independent hash of the multiset of a tensor's nonzero elements, taken
on their BITS (a float32 as its 32 bits, a bf16 or fp16 as its 16): each element's bits x go
through a bijective integer mix h (multiply by an odd constant, then an xor-shift, modulo 2^32,
with h(0) = 0), and the fingerprint is (sum of h(x) modulo 2^63, number of nonzero
elements). So:

- Exact: changing ONE element anywhere changes the sum by h(x') - h(x), which is never 0 because h
  is a bijection and |h(x') - h(x)| < 2^32 (x' = 0 counts too: h(0) = 0 and the count drops).
  Several changed elements cancel only by a 2^-32-scale accident, not systematically.
- Layout-free: the order of elements does not enter, and zeros (all bits 0) contribute nothing.
  vLLM packs q/k/v into one qkv_proj and gate/up into gate_up_proj, pads the vocabulary and
  LoRA slots with zeros, transposes, and shards over tensor-parallel ranks; the fingerprint of a
  packed tensor is the sum of its parts', and a sharded tensor's is the sum of its shards'. The
  comparison needs no copy of vLLM's layouts. The price: a permutation of elements inside one
  compared tensor (a transposed load) is not seen; the behavioural probe covers that.
- Cheap: four int32 operations per element, in cache-sized chunks (no full-size temporaries).

A sampled check (FullFT on CPU between whole read-backs, `rlora.rl.handoff`) fingerprints only
the input columns `sampled_columns(seed, K, count)` of a packed weight; both sides draw the same
columns from the seed the learner picked for that handoff.

The engine side reads the tensors vLLM actually serves (`rlora.engine.sampler.WorkerExtension`);
the learner side casts its master weights exactly as vLLM did (`cast_like_vllm_lora_b`), so the
two agree bit for bit when the handoff worked. This module imports torch only (no vLLM).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["MOD", "Fingerprint", "cast_like_vllm_lora_b", "chunk_fingerprints", "fingerprint", "fingerprint_parts", "sampled_columns"]

MOD = 1 << 63  # fingerprints are sums modulo 2^63: non-negative int64, fit any RPC encoding
K1 = 0x9E3779B1 - (1 << 32)  # as a signed int32; odd, so multiplying by it is a bijection modulo 2^32
CHUNK = 1 << 16  # elements per pass: the temporaries stay in cache (measured 2-4x faster than whole tensors)
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float64: torch.int64}


@dataclass(frozen=True)
class Fingerprint:
    """The multiset hash of a tensor's nonzero elements' bits, and how many there are."""

    hash: int  # sum of mixed bits modulo 2^63
    nonzero: int

    def __add__(self, other: Fingerprint) -> Fingerprint:
        return Fingerprint((self.hash + other.hash) % MOD, self.nonzero + other.nonzero)

    def short(self) -> str:
        return f"{self.hash:016x}/{self.nonzero}"


EMPTY = Fingerprint(0, 0)


def _mix_sum(x: torch.Tensor) -> int:
    """Sum of h(x) over a 1-D int32 tensor of 32-bit patterns; h(0) = 0, so zeros add nothing.

    int32 products wrap modulo 2^32 and `(h >> s) & mask` is a logical shift: each step is a
    bijection of the 32-bit patterns, so h is one.
    """
    h = x * K1
    h ^= (h >> 16) & 0xFFFF
    return int(h.sum(dtype=torch.int64))


def fingerprint(tensor: torch.Tensor) -> Fingerprint:
    """The fingerprint of a tensor as it is (its dtype's bits), on its own device."""
    assert tensor.dtype in BITS, f"no fingerprint for dtype {tensor.dtype}"
    bits = tensor.detach().contiguous().view(-1).view(BITS[tensor.dtype])
    total = 0
    for start in range(0, bits.numel(), CHUNK):
        chunk = bits[start : start + CHUNK]
        if chunk.dtype == torch.int16:  # the 16-bit pattern, unsigned
            chunk = chunk.to(torch.int32) & 0xFFFF
        elif chunk.dtype == torch.int64:  # float64: fold the high half into the low one
            chunk = ((chunk ^ (chunk >> 32)) & 0xFFFFFFFF).to(torch.int32)
        total += _mix_sum(chunk)
    return Fingerprint(total % MOD, int(torch.count_nonzero(bits)))


def fingerprint_parts(tensors: Iterable[torch.Tensor]) -> Fingerprint:
    """The fingerprint of a tensor packed from these parts (in any order and layout)."""
    total = EMPTY
    for t in tensors:
        total = total + fingerprint(t)
    return total


def chunk_fingerprints(tensor: torch.Tensor, parts: int, dim: int) -> tuple[Fingerprint, ...]:
    """Fingerprints of `parts` equal shards along `dim`, as tensor parallelism deals them (torch.chunk)."""
    return tuple(fingerprint(c) for c in torch.chunk(tensor, parts, dim=dim))


def sampled_columns(seed: int, size: int, count: int) -> torch.Tensor:
    """`count` distinct indices in [0, size), sorted, drawn from `seed`: the input columns of a weight
    that an engine worker reads back for a sampled check, recomputed identically by the learner."""
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return perm[: min(count, size)].sort().values


def tensor_seed(seed: int, name: str) -> int:
    """One handoff's seed made particular to a served tensor, so every tensor reads other columns."""
    return (seed ^ zlib.crc32(name.encode())) & ((1 << 62) - 1)


def columns_count(size: int, fraction: float) -> int:
    """How many of `size` input columns a sampled check reads back (at least 8, at most all)."""
    return min(size, max(8, math.ceil(fraction * size)))


def cast_like_vllm_lora_b(lora_b: torch.Tensor, dtype: torch.dtype, scaling: float) -> torch.Tensor:
    """LoRA B as vLLM serves it: cast to the engine dtype (`from_lora_tensors`), then `lora_b *= scaling`
    in that dtype (`LoRALayerWeights.optimize`), skipped when scaling is 1, exactly as vLLM does it."""
    b = lora_b.detach().to(dtype=dtype, copy=True)
    if scaling != 1:
        b *= scaling
    return b


# ----------------------------------------------------------------------------- what a worker reports


@dataclass(frozen=True)
class ServedTensor:
    """One tensor an engine worker serves: its engine name, the checkpoint tensors it holds, its fingerprint."""

    name: str  # e.g. "model.layers.0.self_attn.qkv_proj.weight (served GEMM)" or "...qkv_proj[1].lora_A"
    sources: tuple[str, ...]  # checkpoint names packed into it: q_proj, k_proj, v_proj for a qkv_proj
    print: Fingerprint
    # () when the whole tensor was fingerprinted; else (seed, size, count): only the input columns
    # `sampled_columns(seed, size, count)` of this worker's (N, size) weight were read back
    columns: tuple[int, ...] = ()


@dataclass(frozen=True)
class WorkerPrints:
    """Everything one engine worker serves for one policy version, fingerprinted on that worker."""

    rank: int  # the worker's global rank in the engine
    tp_rank: int
    tp_size: int
    slot: int  # LoRA: the slot holding the adapter (-1: none); FullFT: -1
    slots: tuple[int, ...]  # LoRA: every slot's adapter id (-1: empty); FullFT: ()
    tensors: tuple[ServedTensor, ...]

    @staticmethod
    def from_rpc(raw: dict[str, object]) -> WorkerPrints:
        """From `WorkerExtension.served_*_prints` (plain lists and ints: they cross process boundaries)."""
        rows = raw["tensors"]
        assert isinstance(rows, list), f"worker reported {type(rows)}"
        tensors = tuple(
            ServedTensor(str(r[0]), tuple(str(x) for x in r[1]), Fingerprint(int(r[2]), int(r[3])), tuple(int(x) for x in r[4]) if len(r) > 4 else ())
            for r in rows
        )
        slots = raw.get("slots", [])
        assert isinstance(slots, list)
        return WorkerPrints(
            rank=int(str(raw["rank"])),
            tp_rank=int(str(raw["tp_rank"])),
            tp_size=int(str(raw["tp_size"])),
            slot=int(str(raw.get("slot", -1))),
            slots=tuple(int(x) for x in slots),
            tensors=tensors,
        )
