"""A data-parallel learner over several processes (`torchrun` or `accelerate launch`).

Who does what
- Rank 0 runs the RL loop of `rlora.rl.loop` unchanged: it owns the vLLM engine, samples, grades,
  builds the step's TrainBatch, logs and checkpoints. Its learner is a `LeaderLearner`, which
  has the Learner interface and announces each collective call to the other ranks first.
- Ranks 1..W-1 run `follow(learner)`: they execute rank 0's announced calls on their own
  learner until rank 0 says stop.
- One step: every rank receives the whole batch (one broadcast), takes its rows (`shard_batch`),
  and runs forward/backward on them; the gradients are SUMMED across ranks. The loss is already
  divided by the step's global token count N, so the sum of the shards' gradients is exactly the
  one-process gradient (averaging, as torch DDP does, would divide it by W). Every rank then
  clips by the same global norm and takes the same AdamW step, so the replicas stay identical
  and a 2-process step equals a 1-process step up to float summation order (tested).

Two layouts (config `learner_parallel`):
- `ddp` (`DataParallelLearner`): every rank holds the whole model, LoRA or FullFT; one
  all-reduce(SUM) per trainable gradient after all micro-batches. We do not wrap the model in
  torch's DistributedDataParallel: it averages, and its per-backward hooks would need `no_sync`
  around all but the last micro-batch; one reduction after the micro-batch loop is simpler and
  equal.
- `fsdp` (`ShardedLearner`, FullFT only): torch FSDP2 (`fully_shard`) on every decoder layer,
  on the decoder (its final norm and, when untied, the input embedding) and on an untied output
  layer, so parameters, gradients and AdamW state are sharded, embedding and output layer
  included (half a gigabyte each per rank at 8B instead of 2 GB whole with 16 GB of AdamW state).
  Gradients are reduce-scattered as a SUM (divide factor 1, sum-only collectives, which gloo also
  supports), once per step by default (`fsdp_grad_reduce: step`: unsharded float32 gradients
  accumulate over the micro-batches, 4 bytes/param per rank) or after every micro-batch
  (`micro_batch`: sharded gradients, one reduce-scatter per micro-batch). In bf16, a
  `MixedPrecisionPolicy` (parameters gathered in bf16, gradients reduced in float32) replaces
  autocast: the shards stay float32 master weights, all-gathers move bf16, and no bf16 copy
  outlives its layer. A tied embedding (small models) stays whole and is summed like `ddp`: the
  learner calls the decoder and the output layer separately (logits only at completion
  positions), and tied weights must stay one tensor. Anything that reads the weights (the
  handoff probe's forward, the FullFT handoff, checkpoints) is then collective and runs on every
  rank.

Control plane: announced calls, batches and statistics travel over a separate gloo group with an
explicit timeout (`control_group`, RLORA_CONTROL_TIMEOUT_S, default 6 h), not over NCCL with its
10-minute default: followers wait there while rank 0 samples and evaluates.

Launch: `WORLD_SIZE` > 1 in the environment turns this on; accelerate's `PartialState` reads the
launcher's variables and initialises the process group (gloo on CPU, nccl with a CPU gloo side
on CUDA). With one process nothing here runs: the plain `Learner` makes no distributed call.
Rows are dealt round-robin over rows sorted by length (as `build_batch` leaves them), so every
rank gets a similar token count; shards are padded to equal row counts with empty rows, because
FSDP's per-layer collectives need every rank to run the same number of micro-batches.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from rlora.rl.losses import LossSpec
from rlora.rl.types import PushedWeights, TrainBatch
from rlora.train.learner import DTYPES, BackwardPass, ClipFn, Learner, LearnerHandle, LearnerSpec, make_optimizer, step_stats

STOP = "stop"
T = TypeVar("T")


# ------------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class World:
    """This process's place among the learner processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # index on this node: picks the learner's GPU
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    """Learner processes the launcher started (torchrun and accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_world() -> World:
    """Join the launcher's process group (idempotent); a single process makes no distributed call."""
    if world_size_from_env() == 1:
        return World()
    from accelerate import PartialState

    # gloo on a CPU machine (accelerate wants cpu=True to say so); "cuda:nccl,cpu:gloo" with CUDA
    state = PartialState(cpu=not torch.cuda.is_available())
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    return World(state.process_index, state.num_processes, state.local_process_index, local_size)


def close_world() -> None:
    """Every rank, at the end: a process leaving while another still talks to it aborts (gloo)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    control_group.cache_clear()


def control_timeout() -> timedelta:
    """How long a rank waits for the next control message: RLORA_CONTROL_TIMEOUT_S, default 6 hours.

    Followers wait in `follow` while rank 0 samples, grades and evaluates (an evaluation of 1,500
    problems at 8B takes tens of minutes); the 10-minute default of NCCL would kill the run.
    """
    return timedelta(seconds=float(os.environ.get("RLORA_CONTROL_TIMEOUT_S", 6 * 3600)))


@functools.cache
def control_group() -> dist.ProcessGroup:
    """The control plane: a gloo group over every rank, with `control_timeout`.

    Announced calls, batches and statistics are small pickled CPU objects: over gloo they need
    no GPU memory and never queue behind the NCCL gradient collectives. Created on first use,
    which every rank reaches at the same point (the first `broadcast_object`).
    """
    return dist.new_group(backend="gloo", timeout=control_timeout())


def broadcast_object(obj: object = None) -> object:
    """Rank 0's `obj` on every rank (pickled, over the control group)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def from_rank0(make: Callable[[], T]) -> T:
    """`make()` on rank 0 only (e.g. creating the run directory), its value on every rank."""
    if world_size_from_env() == 1:
        return make()
    world = init_world()
    return broadcast_object(make() if world.is_main else None)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ sharding


def shard_rows(num_rows: int, rank: int, world_size: int) -> list[int]:
    """Rows of one rank: round-robin, so rows sorted by length spread their tokens evenly."""
    return list(range(rank, num_rows, world_size))


def shard_batch(batch: TrainBatch, rank: int, world_size: int) -> TrainBatch:
    """This rank's rows, padded with empty rows (mask 0, length 1) to ceil(B / W) rows on every rank."""
    B = batch.tokens_B_T.shape[0]
    rows_b = torch.tensor(shard_rows(B, rank, world_size), dtype=torch.int64)
    pad = math.ceil(B / world_size) - len(rows_b)

    def take(x_B_T: torch.Tensor, fill: int = 0) -> torch.Tensor:
        return torch.cat([x_B_T[rows_b], torch.full((pad, *x_B_T.shape[1:]), fill, dtype=x_B_T.dtype)])

    return TrainBatch(
        tokens_B_T=take(batch.tokens_B_T),
        targets_B_T=take(batch.targets_B_T),
        mask_B_T=take(batch.mask_B_T),
        sampler_logprobs_B_T=take(batch.sampler_logprobs_B_T),
        advantages_B=take(batch.advantages_B),
        lengths_B=take(batch.lengths_B, fill=1),
        staleness_B=take(batch.staleness_B),
    )


# ------------------------------------------------------------------------------------ gradients


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def sum_gradients(params: list[nn.Parameter]) -> None:
    """All-reduce(SUM) the gradients FSDP does not reduce itself (every one, under `ddp`)."""
    for p in params:
        if is_sharded(p):
            continue
        if p.grad is None:  # a rank whose rows never reached this parameter still takes part
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def clip_sharded_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` over a mix of FSDP-sharded and whole gradients (torch's refuses the mix).

    Sharded gradients add their local squares across ranks; whole ones are equal on every rank
    and count once. Same clipping rule as torch: scale by min(1, max_norm / (norm + 1e-6)).
    """
    grads = [p.grad for p in params if p.grad is not None]
    local_G = [g.to_local() if is_sharded(g) else g for g in grads]
    sharded_sq = torch.zeros((), device=local_G[0].device)
    whole_sq = torch.zeros((), device=local_G[0].device)
    for g, local in zip(grads, local_G):
        if is_sharded(g):
            sharded_sq += local.float().pow(2).sum()
        else:
            whole_sq += local.float().pow(2).sum()
    dist.all_reduce(sharded_sq, op=dist.ReduceOp.SUM)
    total = (sharded_sq + whole_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0).item()
    for g in grads:
        g.mul_(coef)
    return total


def gather_passes(seen: BackwardPass) -> list[BackwardPass]:
    """Every rank's BackwardPass on rank 0 (an empty list elsewhere), for the step's statistics."""
    cpu = seen.cpu()
    out: list[BackwardPass | None] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(cpu, out, dst=0, group=control_group())
    return [p for p in out or [] if p is not None]


# ------------------------------------------------------------------------------------ learners


class DataParallelLearner(Learner):
    """A whole-model replica per rank (`learner_parallel: ddp`); `train_step` is collective."""

    # weights: with an in-memory transfer every rank takes part in it (vLLM's IPC handle all-gather)
    COLLECTIVE = frozenset({"train_step", "empty_cache", "weights", "init_weight_transfer"})

    def train_step(self, batch: TrainBatch, spec: LossSpec, norm: float) -> dict[str, float]:
        """Every rank, same `batch`: this rank's rows, summed gradients, one identical step; stats on rank 0."""
        seen = self.backward(shard_batch(batch, dist.get_rank(), dist.get_world_size()), spec, norm)
        sum_gradients(self.trainable)
        grad_norm = self.optimizer_step()
        passes = gather_passes(seen)
        return step_stats(passes, grad_norm, spec) if passes else {}

    def weights(self) -> Iterable[tuple[str, torch.Tensor]] | PushedWeights:
        return super().weights() if self.transfer is None else pushed_weights(self)


def pushed_weights(learner: Learner) -> Iterable[tuple[str, torch.Tensor]] | PushedWeights:
    """`weights()` with an in-memory transfer attached: rank 0 hands the sampler a `PushedWeights`, whose
    `push` joins the round the other ranks are already in (they push as soon as the call is announced)."""
    if dist.get_rank() == 0:
        return PushedWeights(learner.push_weights, learner.handoff_nbytes())
    learner.push_weights()
    return ()


class ShardedLearner(DataParallelLearner):
    """FullFT with FSDP2 (`learner_parallel: fsdp`): reading the weights is collective too."""

    COLLECTIVE = frozenset({"train_step", "sequence_logprobs", "weights", "state", "empty_cache", "init_weight_transfer"})

    def __init__(self, spec: LearnerSpec) -> None:
        if spec.lora is not None:
            raise ValueError("learner_parallel=fsdp shards full fine-tuning; LoRA runs use learner_parallel=ddp")
        if spec.keep_reference:  # the frozen copy would be whole, unsharded, on every rank
            raise ValueError("learner_parallel=fsdp does not support a KL penalty (kl_coef > 0) yet; use learner_parallel=ddp")
        super().__init__(spec)
        compute = DTYPES[spec.dtype]
        self.mixed = compute != torch.float32  # FSDP casts per unit; autocast would keep low-precision copies alive
        self.tied = self.model.get_output_embeddings().weight is self.model.get_input_embeddings().weight
        self.units = shard_model(self.model, torch.device(spec.device).type, compute if self.mixed else None)
        # fully_shard replaced the parameters: the optimizer must hold the new (sharded) ones
        self.optimizer = make_optimizer(self.model, spec)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # MixedPrecisionPolicy: each unit computes in bf16 from gathered bf16 parameters

    def _head_input(self, hidden_N_H: torch.Tensor) -> torch.Tensor:
        # a tied output layer is the whole float32 embedding (not an FSDP unit): it gets float32 input
        return hidden_N_H.float() if self.mixed and self.tied else hidden_N_H

    def _before_backward(self, last: bool) -> None:
        if self.spec.fsdp_grad_reduce == "step":  # accumulate unsharded gradients; one reduce-scatter after the last micro-batch
            for unit in self.units:
                unit.set_requires_gradient_sync(last, recurse=False)

    def optimizer_step(self, clip_fn: ClipFn = clip_sharded_grad_norm_) -> float:
        return super().optimizer_step(clip_fn)

    def weights(self) -> Iterable[tuple[str, torch.Tensor]] | PushedWeights:
        """Every rank: the whole weights gathered parameter by parameter, on rank 0's host memory
        (with an in-memory transfer: pushed, see `pushed_weights`)."""
        if self.transfer is not None:
            return pushed_weights(self)
        return self.gathered_weights()

    def gathered_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        main = dist.get_rank() == 0
        full = []
        for name, param in self.model.named_parameters():
            tensor = param.full_tensor() if is_sharded(param) else param.detach()
            if main:
                full.append((name, tensor.cpu()))
        return iter(full)

    def state(self) -> dict[str, object]:
        """Every rank: whole weights and an FQN-keyed whole optimizer state, on rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        trainable = dict(self.gathered_weights())
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"trainable": trainable, "optimizer": optimizer}

    def load_state(self, state: dict[str, object]) -> None:
        """Every rank, each with the whole checkpoint (read from the shared run directory)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, state["trainable"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)


def shard_model(model: nn.Module, device_type: str, param_dtype: torch.dtype | None) -> list[nn.Module]:
    """FSDP2 units: each decoder layer, the decoder (its norm, and the embedding when untied), and
    an untied output layer; returns them.

    `param_dtype` (bf16): MixedPrecisionPolicy gathers parameters in it and reduces gradients in
    float32, so the shards stay float32 master weights and no low-precision copy outlives its
    layer. A tied embedding (small models) stays whole: the learner calls the decoder and the
    output layer separately, and the tied weight must stay one tensor.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype is not None else MixedPrecisionPolicy()
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    units = [*decoder.layers, decoder] + ([] if tied else [head])
    for unit in units:
        ignored = {model.get_input_embeddings().weight} if unit is decoder and tied else None
        # reshard after forward, the roots too (FSDP's default keeps a root whole): after a
        # no-grad forward (the handoff probe) the parameters must again be the optimizer's shards
        fully_shard(unit, mesh=mesh, ignored_params=ignored, reshard_after_forward=True, mp_policy=policy)
        # sum, not mean: the loss is already normalised by the global token count
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return units


LEARNERS: dict[str, type[DataParallelLearner]] = {"ddp": DataParallelLearner, "fsdp": ShardedLearner}


def make_learner(spec: LearnerSpec, learner_parallel: str) -> Learner:
    """The plain Learner in a single process; a replicated or sharded one under a launcher."""
    if world_size_from_env() == 1:
        return Learner(spec)
    init_world()
    if spec.device.startswith("cuda"):  # nccl and FSDP work on the current device; under split it is not GPU local_rank
        torch.cuda.set_device(spec.device)
    return LEARNERS[learner_parallel](spec)


# ------------------------------------------------------------------------------------ rank 0 and the others


class LeaderLearner:
    """Rank 0's learner as the RL loop sees it: each collective call is announced to the followers first."""

    def __init__(self, learner: DataParallelLearner) -> None:
        self.learner = learner
        self.spec = learner.spec

    def _call(self, method: str, *args: object) -> object:
        if method in self.learner.COLLECTIVE:
            broadcast_object((method, args))
        return getattr(self.learner, method)(*args)

    def train_step(self, batch: TrainBatch, spec: LossSpec, norm: float) -> dict[str, float]:
        return cast(dict[str, float], self._call("train_step", batch, spec, norm))

    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        return cast(list[float], self._call("sequence_logprobs", token_ids))

    def weights(self) -> Iterable[tuple[str, torch.Tensor]] | PushedWeights:
        return cast(Iterable[tuple[str, torch.Tensor]] | PushedWeights, self._call("weights"))

    def init_weight_transfer(self, backend: str, engine_workers: int, client: object | None) -> None:
        """Every rank attaches the transfer; only rank 0 holds the engine's client (it cannot be pickled)."""
        broadcast_object(("init_weight_transfer", (backend, engine_workers, None)))
        self.learner.init_weight_transfer(backend, engine_workers, client)

    def write_adapter(self, path: Path) -> None:
        self.learner.write_adapter(path)  # LoRA runs are replicated: rank 0 holds the whole adapter

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return self.learner.adapter_tensors()  # replicated, as above

    def state(self) -> dict[str, object]:
        return cast(dict[str, object], self._call("state"))

    def empty_cache(self) -> None:
        self._call("empty_cache")  # every rank: ranks that share a GPU with an engine worker (tp > 1) too

    def close(self) -> None:
        """Release the followers from `follow`."""
        broadcast_object((STOP, ()))


def lead(learner: Learner) -> LearnerHandle:
    """Rank 0's handle: the learner itself in a single process."""
    return LeaderLearner(learner) if isinstance(learner, DataParallelLearner) else learner


def follow(learner: DataParallelLearner) -> None:
    """Ranks > 0: run rank 0's announced calls on this rank's learner until it says stop."""
    while True:
        call = broadcast_object()
        assert isinstance(call, tuple) and len(call) == 2, f"rank 0 announced {call!r}"
        method, args = call
        if method == STOP:
            return
        assert method in learner.COLLECTIVE, f"rank 0 announced {method!r}, which is not collective"
        getattr(learner, method)(*args)


def shutdown(learner: LearnerHandle) -> None:
    """Rank 0 at the end of a run: release the followers and leave the process group (one process: nothing)."""
    if isinstance(learner, LeaderLearner):
        learner.close()
        close_world()
