"""FullFT handoff in GPU memory through vLLM's weight transfer API (`vllm.distributed.weight_transfer`).

An engine in the learner's own process takes the new weights by reference (`reload_weights` with
the learner's tensors): nothing to transfer. An engine in its own process (several learner
processes, or tensor parallelism) needs the weights moved, and config `weight_transfer` says how:
- `ipc` (auto with colocate or sleep): the engine shares the learners' GPUs. Every learner rank
  materialises each parameter in the engine's dtype on its own GPU (FSDP gathers it) into a
  packed buffer and shares a CUDA IPC handle; rank 0 sends the merged handles and each engine
  worker copies from the buffer on its own GPU. No host memory, no file.
- `nccl` (auto with split): rank 0 broadcasts the packed parameters over an NCCL group it forms
  with the engine's workers, which sit on other GPUs.
- `file`: the fallback, and the only way on CPU: a safetensors file in /dev/shm (or on disk when
  /dev/shm is too small), cast on the device first (`rlora.engine.sampler.save_safetensors`).

vLLM's trainer-side engines (`IPCTrainerWeightTransferEngine`, `NCCLTrainerWeightTransferEngine`)
drive the round trip: `start_weight_update`, `update_weights`, `finish_weight_update` on every
engine worker, which `EngineClient` reaches through `LLM.collective_rpc` (the offline LLM has no
weight-sync methods of its own). `trainer_init` and `send_weights` run on every learner rank;
rank 0 is the sender. Written against the weight transfer module of vLLM 0.33 (the CPU build 0.32
ships the same module, which the CPU tests import); not yet run on a GPU.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import torch
from torch import nn

from rlora.config import ConfigError

TRANSFERS = ("auto", "file", "ipc", "nccl")


def choose_transfer(choice: str, device: str, in_process: bool, placement: str) -> str:
    """The FullFT handoff path: direct (in-process engine), file, ipc or nccl; impossible choices raise ConfigError."""
    if choice not in TRANSFERS:
        raise ConfigError(f"config key 'weight_transfer' must be one of {list(TRANSFERS)}, got {choice!r}")
    if device == "cpu" and choice in ("ipc", "nccl"):
        raise ConfigError(f"config key 'weight_transfer': {choice} moves weights between GPUs; on CPU the handoff is direct or a file (auto or file)")
    if in_process:
        return "direct"  # the engine reads the learner's tensors by reference
    if device == "cpu" or choice == "file":
        return "file"
    if choice == "ipc" and placement == "split":
        raise ConfigError("config key 'weight_transfer': ipc needs the engine on the learners' GPUs; with placement split use nccl (or auto)")
    if choice == "auto":
        return "nccl" if placement == "split" else "ipc"
    return choice


class EngineClient:
    """vLLM's `VLLMWeightSyncClient` protocol over an offline `LLM`: each call runs on every engine worker."""

    def __init__(self, llm: object) -> None:
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, object]) -> None:
        self.llm.collective_rpc("init_weight_transfer_engine", args=(init_info,))  # type: ignore[attr-defined]

    def start_weight_update(self) -> None:
        self.llm.collective_rpc("start_weight_update")  # type: ignore[attr-defined]

    def update_weights(self, update_info: object) -> None:
        self.llm.collective_rpc("update_weights", args=(update_info,))  # type: ignore[attr-defined]

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.collective_rpc("finish_weight_update")  # type: ignore[attr-defined]


class FollowerClient:
    """Learner ranks > 0 hold no engine: vLLM's trainer engines call the client only on the sender."""

    def _never(self, *args: object) -> None:
        raise RuntimeError("a non-sender learner rank tried to reach the engine")

    init_weight_transfer_engine = start_weight_update = update_weights = finish_weight_update = _never


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter: an FSDP shard is gathered (a collective, in the same order on every rank)."""
    from torch.distributed.tensor import DTensor

    return param.full_tensor() if isinstance(param, DTensor) else param.detach()


def model_source(model: nn.Module, dtype: torch.dtype) -> object:
    """A vLLM `WeightSource` over the policy's parameters in checkpoint names, in the engine's dtype."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class PolicyWeights(WeightSource):  # vLLM's class is opaque (Any) to mypy
        def metadata(self) -> list[object]:
            return [ParamMeta(name, dtype, tuple(p.shape)) for name, p in model.named_parameters()]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            for name, param in model.named_parameters():
                yield name, full_tensor(param).to(dtype)  # cast on the GPU: half the bytes moved

    return PolicyWeights()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trainer_engine(backend: str, rank: int, client: object, source: object, engine_workers: int) -> object:
    """vLLM's trainer-side transfer engine for this learner rank (rank 0 rendezvous with the engine's workers)."""
    if backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo, IPCTrainerWeightTransferEngine

        # packed: one bounded staging buffer instead of a bf16 copy of the whole model kept alive until the round ends
        return IPCTrainerWeightTransferEngine.trainer_init(IPCTrainerInitInfo(rank=rank, packed=True), client=client, source=source)
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        info = NCCLTrainerInitInfo(rank=rank, master_address="127.0.0.1", master_port=free_port(), world_size=1 + engine_workers)
        return NCCLTrainerWeightTransferEngine.trainer_init(info, client=client, source=source)
    raise ConfigError(f"config key 'weight_transfer': no in-memory transfer {backend!r} (ipc or nccl)")
