"""Where the sampler (vLLM) and the learner ranks run: a pure function of the config and the machine.

Placements (config key `placement`):
- `colocate` (default): the engine and the learners share devices. On CUDA the engine takes the
  first `tensor_parallel_size` GPUs (its share capped by `gpu_memory_utilization`) and learner
  rank r takes GPU r. On CPU this is the only placement.
- `split`: the engine gets the first `tensor_parallel_size` GPUs and the learner ranks the next
  ones (rank r on GPU tp + r): nothing shared, so the engine may take most of its GPUs' memory.
- `sleep`: colocate, and the engine sleeps while the learner steps (vLLM sleep level 1 for
  LoRA: base weights to host memory; level 2 for FullFT: weights dropped, since the handoff
  overwrites them; the KV cache dropped either way) and wakes before the handoff, after the
  learner processes emptied their CUDA caches (`Sampler.asleep`). CUDA only: vLLM's sleep mode
  needs its CUDA allocator, and vLLM refuses it on CPU.

`tensor_parallel_size` > 1 shards the engine over several devices: GPUs on CUDA, CPU cores on
CPU (vLLM's CPU workers, one per core group, bound by `VLLM_CPU_OMP_THREADS_BIND`, which is set
here because vLLM's automatic binding wants a NUMA node per worker).

The engine runs inside the rank-0 process (start in seconds, FullFT weights passed by
reference) only when it is alone there: one learner process and no tensor parallelism. With
several learner processes it runs in its own spawned process (vLLM V1 multiprocessing), because
an in-process vLLM on rank 0 would build its own process groups over every rank of the
learners' torch.distributed world; with tensor parallelism vLLM needs worker processes anyway.
FullFT weights then reach it as a safetensors file in /dev/shm (`Sampler.load_weights`).

GPUs are handed to vLLM as `device_ids` (indices into CUDA_VISIBLE_DEVICES when it is set),
not by changing CUDA_VISIBLE_DEVICES, so the learner process keeps seeing every GPU and rank r
can use `cuda:<its index>`. One node: learner ranks are placed by their local rank; the engine
lives on node 0 with global rank 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlora.config import ConfigError

if TYPE_CHECKING:
    from rlora.config import RLConfig
    from rlora.train.distributed import World

PLACEMENTS = ("colocate", "split", "sleep")


@dataclass(frozen=True)
class Placement:
    """Devices of one learner process and, on rank 0, of the engine it owns."""

    sampler_gpus: tuple[int, ...]  # the engine's GPUs (vLLM device_ids); () on CPU
    learner_device: str  # this process's learner: "cpu" or "cuda:<i>"
    engine_in_process: bool  # the engine lives in the rank-0 process (else its own process)
    sleep: bool  # the engine sleeps during the learner's step
    cpu_threads_bind: str = ""  # VLLM_CPU_OMP_THREADS_BIND for CPU tensor parallelism ("" = vLLM's default)


def plan_placement(
    placement: str,
    tensor_parallel_size: int,
    world_size: int,
    local_rank: int,
    local_world_size: int,
    device: str,
    gpu_count: int,
    cpu_cores: tuple[int, ...],
) -> Placement:
    """Devices for the learner process `local_rank` of `local_world_size` (of `world_size` in all).

    `device` is the resolved config device ("cpu", "cuda" or "cuda:N"); `gpu_count` the GPUs
    torch sees; `cpu_cores` the cores this process may use. Impossible requests raise
    ConfigError naming the key.
    """
    if placement not in PLACEMENTS:
        raise ConfigError(f"config key 'placement' must be one of {list(PLACEMENTS)}, got {placement!r}")
    if tensor_parallel_size < 1:
        raise ConfigError(f"config key 'tensor_parallel_size' must be >= 1, got {tensor_parallel_size}")
    in_process = world_size == 1 and tensor_parallel_size == 1
    if device == "cpu":
        return _plan_cpu(placement, tensor_parallel_size, in_process, cpu_cores)
    gpus = _run_gpus(device, gpu_count, local_world_size)
    tp = tensor_parallel_size
    first_learner = tp if placement == "split" else 0
    need = max(tp, first_learner + local_world_size)
    if need > len(gpus):
        raise ConfigError(
            f"config key 'placement': {placement} with tensor_parallel_size={tp} and {local_world_size} learner "
            f"process(es) per node needs {need} GPUs; {len(gpus)} visible ({device})"
        )
    return Placement(tuple(gpus[:tp]), f"cuda:{gpus[first_learner + local_rank]}", in_process, placement == "sleep")


def _plan_cpu(placement: str, tensor_parallel_size: int, in_process: bool, cpu_cores: tuple[int, ...]) -> Placement:
    if placement == "split":
        raise ConfigError("config key 'placement': split puts the sampler and the learner on different GPUs; it needs CUDA (device=cpu)")
    if placement == "sleep":
        raise ConfigError("config key 'placement': sleep needs CUDA: vLLM's sleep mode is not available on CPU (device=cpu)")
    bind = cpu_threads_bind(cpu_cores, tensor_parallel_size) if tensor_parallel_size > 1 else ""
    return Placement((), "cpu", in_process, False, bind)


def _run_gpus(device: str, gpu_count: int, local_world_size: int) -> list[int]:
    """The GPU indices this run may use: all visible ones for "cuda", one for "cuda:N"."""
    if gpu_count < 1:
        raise ConfigError(f"config key 'device' is {device!r} but torch sees no CUDA device")
    if device == "cuda":
        return list(range(gpu_count))
    index = int(device.split(":")[1])
    if index >= gpu_count:
        raise ConfigError(f"config key 'device' names {device!r}; only {gpu_count} GPU(s) visible")
    if local_world_size > 1:
        raise ConfigError(f"config key 'device' pins one GPU ({device!r}); with several learner processes use device=cuda")
    return [index]


def cpu_threads_bind(cpu_cores: tuple[int, ...], tensor_parallel_size: int) -> str:
    """vLLM's CPU binding: the cores split into `tensor_parallel_size` contiguous groups, "0-3|4-7"."""
    if tensor_parallel_size > len(cpu_cores):
        raise ConfigError(f"config key 'tensor_parallel_size' is {tensor_parallel_size}, but only {len(cpu_cores)} CPU cores are available")
    per = len(cpu_cores) // tensor_parallel_size
    groups = [sorted(cpu_cores)[i * per : (i + 1) * per] for i in range(tensor_parallel_size)]
    return "|".join(",".join(map(str, g)) for g in groups)


def placement_for(cfg: RLConfig, device: str, world: World) -> Placement:
    """`plan_placement` for this process on this machine (GPUs torch sees, cores it may use)."""
    import torch

    gpu_count = torch.cuda.device_count() if device.startswith("cuda") else 0
    return plan_placement(
        cfg.placement,
        cfg.tensor_parallel_size,
        world.size,
        world.local_rank,
        world.local_size,
        device,
        gpu_count,
        tuple(sorted(os.sched_getaffinity(0))),
    )
