"""Which device and which precision a run uses, decided once at start.

`dtype: auto` (the default) picks bfloat16 only where the hardware computes it natively: CUDA GPUs
that support bf16, and CPUs with AVX512-BF16 or AMX. Elsewhere it picks float32, because torch's
bf16 matrix products on a CPU without those instructions fall back to a scalar loop: measured on
an AVX2-only AMD EPYC, 1.2 GFLOP/s in bf16 against 97.5 in float32 (../shared/notes/vllm_cpu.md),
so a bf16 run there is tens of times slower than the same run in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from pathlib import Path
from typing import TypeVar

import torch

from rlora.config import TrainConfig

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 matrix math
C = TypeVar("C", bound=TrainConfig)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA device")
    return device


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is missing."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(device: str) -> tuple[bool, str]:
    """(whether `device` computes bf16 matrix products natively, the evidence in words)."""
    if device.startswith("cuda"):
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        return ok, f"{name} {'supports' if ok else 'does not support'} bf16"
    found = sorted(cpu_flags() & set(CPU_BF16_FLAGS))
    capability = torch.backends.cpu.get_cpu_capability()
    if found:
        return True, f"the CPU has {', '.join(found)} (torch kernels: {capability})"
    return False, f"the CPU has no AVX512-BF16 or AMX (torch kernels: {capability}); bf16 would run tens of times slower"


def resolve_dtype(dtype: str, device: str) -> tuple[str, str]:
    """(the concrete dtype for `dtype` on `device`, why). `auto` picks bf16 only where it is native."""
    native, why = native_bf16(device)
    if dtype == "auto":
        return ("bfloat16" if native else "float32"), f"dtype auto -> {'bfloat16' if native else 'float32'}: {why}"
    if dtype == "bfloat16" and not native:
        return dtype, f"dtype bfloat16 as configured, although {why}"
    return dtype, f"dtype {dtype} as configured"


_said: set[str] = set()


def resolve_precision(cfg: C) -> C:
    """`cfg` with `dtype` resolved for its device (a no-op for an explicit dtype).

    `auto` prints its choice and the reason once per process; an explicit bfloat16 on a CPU
    without native bf16 warns that it runs tens of times slower.
    """
    configured = cfg.dtype
    dtype, why = resolve_dtype(configured, resolve_device(cfg.device))
    if why not in _said and (configured == "auto" or "slower" in why):
        _said.add(why)
        print(f"rlora: {why}", file=sys.stderr)
        if configured == "bfloat16":
            warnings.warn(f"rlora: {why}. Set dtype=auto or dtype=float32 for speed.", stacklevel=2)
    return cfg if dtype == configured else dataclasses.replace(cfg, dtype=dtype)
