"""A memory and time plan of an RL run on a node, from the model's config alone (no weights).

`rlora plan CONFIG --gpus N --gpu-memory-gib G` prints it; `rlora rl`, `rl-multi` and `launch` run
the same check before anything loads and refuse a config that cannot fit, naming the key to change.

The model is built on torch's meta device from its config (a local folder's config.json, or the
small table of known architectures below, since the machines rlora is built on cannot reach the
Hub), so parameters are counted exactly and nothing is allocated.

Bytes per learner device (one process; rank 0 is the fullest, it shares GPU 0 with the engine):
- weights: LoRA: the frozen base in the compute dtype + float32 factors; FullFT: float32
  master weights (sharded over the ranks with `learner_parallel: fsdp`), plus, for bf16 without
  FSDP, the bf16 copies autocast keeps through backward, and with `kl_coef` > 0 a float32 copy
  of the initial weights (the reference policy; LoRA's is its own base with the adapter off).
- gradients float32 and AdamW state (2 x float32) of the trainable parameters, sharded with fsdp
  (whole float32 gradients when `fsdp_grad_reduce: step` accumulates over several micro-batches;
  a tied embedding stays whole under fsdp).
- activations of one micro-batch of `micro_batch` rows x T tokens (T = prompt allowance +
  max_tokens, capped at max_model_len; a base model often writes to max_tokens, so the worst case
  is the plan), counted per decoder layer as the tensors autograd saves in an HF Llama/Qwen layer
  (no activation checkpointing): two RMSNorms (float32 input copy, normalised and scaled outputs),
  q, k and v repeated to every head (GQA with a padding mask), the attention output and its
  reshaped copy, and gate, SiLU, up and their product in the MLP.
- logits at the completion positions only: the compute-dtype logits, float32 log-softmax, and
  the entropy's exp and product (4 + 4 + 4 + c bytes per completion token and vocabulary entry).
- optimizer temporaries on CUDA (foreach AdamW), at the optimizer step when activations are free.
- the engine: vLLM takes `gpu_memory_utilization` of the device's TOTAL memory whatever the
  learner holds: its weights, ~2.5 GiB of activations and CUDA graphs, the rest KV cache. With
  `placement: sleep` it frees that while the learner steps; with `split` it is on its own GPUs.
A device fits when its peak stays below its memory less a headroom (CUDA context, allocator
fragmentation, NCCL buffers: 2 GiB + 5%).

Time per step (estimates, to be replaced by measurements): learner 6N (FullFT) or 4N (LoRA)
FLOPs per token at 40% of peak; sampling bound by memory bandwidth (weights plus the KV cache of
the sequences in flight read per decoded token, 70% of peak bandwidth); the handoff's bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rlora.config import ConfigError, RLConfig

GIB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Prompt tokens allowed for, by prompt format and task (a chat template adds ~30 tokens; the few-shot
# formats add their worked examples: ~400 tokens of GSM8K, ~700 of Minerva MATH).
PROMPT_TOKENS = {"arith": 64, "arith_chain": 64, "gsm8k": 256, "math": 384}
FEWSHOT_TOKENS = {"arith": 400, "arith_chain": 400, "gsm8k": 400, "math": 700}
ENGINE_OVERHEAD_GPU = int(2.5 * GIB)  # vLLM's profiled activations, sampler buffers and CUDA graphs
ENGINE_OVERHEAD_CPU = int(0.5 * GIB)
SLEEPING_ENGINE = int(1.0 * GIB)  # what a sleeping engine keeps on the GPU (CUDA graphs, buffers)
MFU, BANDWIDTH_EFFICIENCY = 0.4, 0.7

# Architectures of the GPU presets, from their config.json on the Hub (no Hub here), in
# transformers' config keys; any other model is read from its folder (or from the Hub where reachable).
KNOWN_ARCHITECTURES: dict[str, dict[str, object]] = {
    "meta-llama/Llama-3.1-8B": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "meta-llama/Llama-3.2-1B": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen3-8B-Base": {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
}
KNOWN_ARCHITECTURES["meta-llama/Llama-3.1-8B-Instruct"] = KNOWN_ARCHITECTURES["meta-llama/Llama-3.1-8B"]
KNOWN_ARCHITECTURES["meta-llama/Llama-3.2-1B-Instruct"] = KNOWN_ARCHITECTURES["meta-llama/Llama-3.2-1B"]


# ------------------------------------------------------------------------------------ the model


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """What the plan needs of a model, counted on the meta device."""

    name: str
    params: int  # unique parameters (a tied output layer counts once)
    largest_param: int  # elements of the largest tensor (the embedding): bounds per-tensor temporaries
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # the output layer is the input embedding (FSDP keeps it whole)
    linears: tuple[tuple[str, int, int], ...]  # (module name, in, out) of every decoder-layer nn.Linear

    def lora_params(self, rank: int, targets: Sequence[str]) -> int:
        return sum(rank * (d_in + d_out) for name, d_in, d_out in self.linears if name.rsplit(".", 1)[-1] in targets)

    @property
    def kv_bytes_per_token(self) -> int:
        """Per engine dtype byte: K and V of every layer (multiply by the dtype's bytes)."""
        return 2 * self.layers * self.kv_heads * self.head_dim


def model_config(model: str) -> object:
    """transformers' config of `model`: a known architecture, a local folder (the default included), or the Hub."""
    from transformers import AutoConfig

    if model in KNOWN_ARCHITECTURES:
        known = dict(KNOWN_ARCHITECTURES[model])
        return AutoConfig.for_model(str(known.pop("model_type")), **known)
    from rlora.train.models import resolve_model

    path = resolve_model(model)
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as e:
        raise ConfigError(f"config key 'model': no config for {model!r} (not a local folder, not in rlora.plan.KNOWN_ARCHITECTURES, Hub: {e})") from None


@functools.cache
def architecture(model: str) -> Architecture:
    """Count `model`'s parameters on the meta device: no weights are read or allocated."""
    return architecture_of(model_config(model), model)


def architecture_of(config: object, name: str) -> Architecture:
    """The Architecture of a transformers config, counted on the meta device."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    params = list(net.parameters())  # unique: a tied lm_head is the embedding's Parameter
    layer_linears = tuple((name, m.in_features, m.out_features) for name, m in net.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{name}")
    get = lambda key, default=0: int(getattr(config, key, None) or default)  # noqa: E731
    heads = get("num_attention_heads")
    return Architecture(
        name=name,
        params=sum(p.numel() for p in params),
        largest_param=max(p.numel() for p in params),
        layers=get("num_hidden_layers"),
        hidden=get("hidden_size"),
        intermediate=get("intermediate_size"),
        heads=heads,
        kv_heads=get("num_key_value_heads", heads),
        head_dim=get("head_dim", get("hidden_size") // heads),
        vocab=get("vocab_size"),
        tied=net.get_output_embeddings().weight is net.get_input_embeddings().weight,
        linears=layer_linears,
    )


# ------------------------------------------------------------------------------------ learner memory


def activation_bytes_per_token(arch: Architecture, compute_bytes: int) -> int:
    """Bytes autograd keeps per token through one forward (all layers), as counted in the module docstring."""
    d, m, c = arch.hidden, arch.intermediate, compute_bytes
    norm = d * (4 + 2 * c)  # float32 input copy (the residual itself in float32), normalised, scaled
    attention = c * (d + 2 * arch.heads * arch.head_dim + d + d)  # q, k and v repeated to every head, output, reshaped output
    mlp = c * 4 * m  # gate, SiLU(gate), up, product
    return arch.layers * (2 * norm + attention + mlp) + 2 * d * 4  # + the final norm's float32 input


def logits_bytes_per_token(arch: Architecture, compute_bytes: int) -> int:
    """Logits in the compute dtype, float32 log-softmax, the entropy's exp and product, per completion token."""
    return arch.vocab * (compute_bytes + 12)


@dataclass(frozen=True, kw_only=True)
class LearnerShape:
    """One learner process: what it trains, in which precision, on how many ranks, on what micro-batches."""

    full: bool  # FullFT (else LoRA)
    trainable: int  # parameters with gradients (all, or the LoRA factors)
    compute_bytes: int  # 2 for bf16/fp16, 4 for float32
    shards: int  # FSDP ranks the FullFT state is split over (1: not sharded)
    rows: int  # rows of one micro-batch
    seq_len: int  # tokens of the longest row
    completion_tokens: int  # completion tokens of one micro-batch (logits are built only there)
    cuda: bool  # foreach AdamW temporaries and the CUDA allocator
    unsharded_grads: bool = False  # FSDP with one reduce-scatter per step and several micro-batches: whole float32 gradients accumulate
    reference: bool = False  # FullFT with a KL penalty (kl_coef > 0): a frozen float32 copy of the initial weights


@dataclass(frozen=True, kw_only=True)
class LearnerMemory:
    weights: int
    gradients: int
    optimizer: int
    activations: int  # one micro-batch
    logits: int  # one micro-batch
    optimizer_temps: int  # at the optimizer step, when activations are free

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def peak(self) -> int:
        return self.static + max(self.activations + self.logits, self.optimizer_temps)


def learner_memory(arch: Architecture, shape: LearnerShape) -> LearnerMemory:
    """Bytes of one learner process at its peak (gradients of earlier micro-batches are alive, so they count)."""
    shards = shape.shards if shape.full else 1
    whole = arch.vocab * arch.hidden if shape.full and shards > 1 and arch.tied else 0  # a tied embedding stays whole under FSDP
    if shape.full:
        weights = 4 * (arch.params - whole) // shards + 4 * whole  # float32 master weights
        if shape.compute_bytes < 4 and shards == 1:
            weights += shape.compute_bytes * arch.params  # autocast's low-precision copies, kept for backward
        elif shape.compute_bytes < 4:
            weights += 2 * shape.compute_bytes * arch.params // arch.layers  # MixedPrecisionPolicy: two gathered layers (one prefetched)
        if shape.reference:
            weights += 4 * arch.params  # the KL penalty's reference policy (LoRA's is its own base with the adapter off)
    else:
        weights = shape.compute_bytes * arch.params + 4 * shape.trainable
    trainable = (shape.trainable - whole) // shards + whole
    tokens = shape.rows * shape.seq_len
    return LearnerMemory(
        weights=weights,
        gradients=4 * (shape.trainable if shape.unsharded_grads else trainable),
        optimizer=8 * trainable,
        activations=tokens * activation_bytes_per_token(arch, shape.compute_bytes),
        logits=shape.completion_tokens * logits_bytes_per_token(arch, shape.compute_bytes),
        optimizer_temps=(8 * trainable) if shape.cuda else 8 * min(trainable, arch.largest_param),
    )


# ------------------------------------------------------------------------------------ the node


@dataclass(frozen=True, kw_only=True)
class Node:
    """The devices a run gets: GPUs (all alike) or the host."""

    gpus: int  # 0: a CPU run
    device_memory: int  # bytes per GPU, or the host's memory
    peak_flops: float  # bf16 dense (CPU: the measured float32 rate)
    bandwidth: float  # bytes/s of device memory

    @property
    def cuda(self) -> bool:
        return self.gpus > 0

    @property
    def headroom(self) -> int:
        return 2 * GIB + self.device_memory // 20


def gpu_node(gpus: int, memory_gib: float) -> Node:
    """An H100 (80 GB) or, above 100 GiB, an H200 (141 GB): the same compute, more and faster memory."""
    bandwidth = 4.8e12 if memory_gib > 100 else 3.35e12
    return Node(gpus=gpus, device_memory=int(memory_gib * GIB), peak_flops=989e12, bandwidth=bandwidth)


def cpu_node() -> Node:
    """This host: its memory (MemTotal: other processes come and go), ~0.2 TFLOP/s float32 on 2 cores (docs/benchmarks.md)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Node(gpus=0, device_memory=total, peak_flops=0.19e12 / MFU, bandwidth=20e9 / BANDWIDTH_EFFICIENCY)


def this_node(device: str) -> Node:
    """The node `rlora rl` runs on: every GPU torch sees (memory of the first), or the host."""
    if not device.startswith("cuda"):
        return cpu_node()
    import torch

    return gpu_node(torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory / GIB)


# ------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True, kw_only=True)
class Device:
    """One device's share of the run, in bytes."""

    name: str  # "gpu 0 (learner rank 0 + engine)", "host", ...
    learner: LearnerMemory | None
    engine_weights: int = 0
    engine_other: int = 0
    kv_cache: int = 0  # what the engine's budget leaves for KV (negative: the budget does not hold the weights)
    sleeping_engine: int = 0  # placement sleep: what the engine keeps while the learner steps
    capacity: int = 0

    @property
    def engine(self) -> int:
        return self.engine_weights + self.engine_other + max(self.kv_cache, 0)

    @property
    def peak(self) -> int:
        if self.learner is None:
            return self.engine
        if self.sleeping_engine:  # learner steps while the engine sleeps; the engine samples while the learner holds its state
            return max(self.learner.peak + self.sleeping_engine, self.learner.static + self.engine)
        return self.learner.peak + self.engine


@dataclass(frozen=True, kw_only=True)
class Plan:
    config: RLConfig
    node: Node
    arch: Architecture
    learners: int  # learner processes
    devices: tuple[Device, ...]
    handoff_bytes: int
    kv_tokens: int  # tokens the engine's KV cache holds
    seq_len: int
    times: dict[str, float]
    problems: tuple[tuple[str, str], ...]  # (config key, why) for everything that does not fit

    @property
    def fits(self) -> bool:
        return not self.problems


def seq_len(cfg: RLConfig) -> int:
    """The planned longest row: prompt allowance + max_tokens, capped at max_model_len."""
    prompt = PROMPT_TOKENS.get(cfg.task, 256) + (FEWSHOT_TOKENS.get(cfg.task, 400) if cfg.prompt_format == "fewshot" else 0)
    return min(cfg.max_model_len, prompt + cfg.max_tokens)


def learner_shape(cfg: RLConfig, arch: Architecture, learners: int, cuda: bool) -> LearnerShape:
    from rlora.train.setup import lora_spec

    spec = lora_spec(cfg)
    rows_per_rank = -(-cfg.prompts_per_step * cfg.group_size // learners)
    rows = min(cfg.micro_batch, rows_per_rank)
    sharded = cfg.is_full and cfg.learner_parallel == "fsdp" and learners > 1
    return LearnerShape(
        full=cfg.is_full,
        trainable=arch.params if spec is None else arch.lora_params(spec.rank, spec.targets),
        compute_bytes=compute_bytes(cfg.dtype, cuda),
        shards=learners if sharded else 1,
        unsharded_grads=sharded and cfg.fsdp_grad_reduce == "step" and rows_per_rank > cfg.micro_batch,
        reference=cfg.is_full and cfg.kl_coef > 0,
        rows=rows,
        seq_len=seq_len(cfg),
        completion_tokens=rows * cfg.max_tokens,
        cuda=cuda,
    )


def compute_bytes(dtype: str, cuda: bool) -> int:
    """Bytes of the compute dtype; `auto` is bf16 on a GPU (the CPU case is resolved before planning)."""
    if dtype == "auto":
        return 2 if cuda else 4
    return DTYPE_BYTES[dtype]


def engine_parts(cfg: RLConfig, arch: Architecture, node: Node) -> tuple[int, int, int, int]:
    """(engine weights, other, KV cache, KV tokens) per engine device."""
    c = compute_bytes(cfg.dtype, node.cuda)
    tp = cfg.tensor_parallel_size
    weights = c * arch.params // tp  # LoRA slots (max_loras x rank) are megabytes: inside `other`
    if node.cuda:
        budget = int(cfg.gpu_memory_utilization * node.device_memory)
        other = ENGINE_OVERHEAD_GPU
        kv = budget - weights - other
    else:
        other = ENGINE_OVERHEAD_CPU
        kv = int(max(1, round(cfg.kv_cache_gib)) * GIB) if cfg.kv_cache_gib >= 1 else int(cfg.kv_cache_gib * GIB)
    kv_tokens = max(kv, 0) * tp // (c * arch.kv_bytes_per_token)
    return weights, other, kv, kv_tokens


def plan_run(cfg: RLConfig, node: Node, learners: int | None = None) -> Plan:
    """The plan of `cfg` on `node`: `learners` processes (default: every GPU but the engine's under split, else every GPU)."""
    arch = architecture(cfg.model)
    tp = cfg.tensor_parallel_size
    if learners is None:
        learners = max(1, node.gpus - tp) if cfg.placement == "split" else max(1, node.gpus)
    problems: list[tuple[str, str]] = []
    if node.cuda and (learners + (tp if cfg.placement == "split" else 0) > node.gpus or tp > node.gpus):
        problems.append(("placement", f"{cfg.placement} with tensor_parallel_size={tp} and {learners} learner process(es) needs more than {node.gpus} GPUs"))
    shape = learner_shape(cfg, arch, learners, node.cuda)
    learner = learner_memory(arch, shape)
    weights, other, kv, kv_tokens = engine_parts(cfg, arch, node)
    capacity = node.device_memory - node.headroom
    if not node.cuda:
        devices: tuple[Device, ...] = (
            Device(name="host (learner + engine)", learner=learner, engine_weights=weights, engine_other=other, kv_cache=kv, capacity=capacity),
        )
    elif cfg.placement == "split":
        devices = (
            Device(
                name=f"gpu 0-{tp - 1} (engine)" if tp > 1 else "gpu 0 (engine)",
                learner=None,
                engine_weights=weights,
                engine_other=other,
                kv_cache=kv,
                capacity=capacity,
            ),
            Device(name=f"gpu {tp} (learner rank 0)", learner=learner, capacity=capacity),
        )
    else:
        sleeping = SLEEPING_ENGINE if cfg.placement == "sleep" else 0
        first = Device(
            name="gpu 0 (learner rank 0 + engine)",
            learner=learner,
            engine_weights=weights,
            engine_other=other,
            kv_cache=kv,
            sleeping_engine=sleeping,
            capacity=capacity,
        )
        devices = (first,) if learners == 1 else (first, Device(name=f"gpu 1-{learners - 1} (learner ranks)", learner=learner, capacity=capacity))
    problems += memory_problems(cfg, arch, devices, kv, kv_tokens, node)
    c = compute_bytes(cfg.dtype, node.cuda)
    handoff = c * (arch.params if cfg.is_full else shape.trainable)
    times = step_times(cfg, arch, node, learners, kv_tokens, handoff)
    return Plan(
        config=cfg,
        node=node,
        arch=arch,
        learners=learners,
        devices=devices,
        handoff_bytes=handoff,
        kv_tokens=kv_tokens,
        seq_len=shape.seq_len,
        times=times,
        problems=tuple(problems),
    )


def memory_problems(cfg: RLConfig, arch: Architecture, devices: Sequence[Device], kv: int, kv_tokens: int, node: Node) -> list[tuple[str, str]]:
    """Every device over its capacity, and an engine that cannot hold one sequence, with the key to change."""
    out: list[tuple[str, str]] = []
    if kv_tokens < cfg.max_model_len:
        key = "gpu_memory_utilization" if node.cuda else "kv_cache_gib"
        out.append((key, f"the engine's KV cache holds {kv_tokens} tokens ({gib(kv)} GiB), less than one sequence of max_model_len={cfg.max_model_len}"))
    for d in devices:
        if d.peak > d.capacity:
            out.append((blame(cfg, d, node), f"{d.name} needs {gib(d.peak)} GiB, more than its {gib(d.capacity)} GiB (device less headroom)"))
    return out


def blame(cfg: RLConfig, device: Device, node: Node) -> str:
    """The config key whose change helps most on an over-full device."""
    lm = device.learner
    if lm is None:
        return "gpu_memory_utilization"
    if cfg.is_full and lm.static > device.capacity // 2 and cfg.learner_parallel != "fsdp":
        return "learner_parallel"
    if cfg.is_full and cfg.learner_parallel == "fsdp" and cfg.fsdp_grad_reduce == "step" and lm.gradients > lm.optimizer:
        return "fsdp_grad_reduce"
    if lm.activations + lm.logits > max(lm.static, device.engine):
        return "micro_batch"
    if device.engine > lm.peak and node.cuda:
        return "gpu_memory_utilization"
    return "placement" if node.cuda and cfg.placement == "colocate" else "micro_batch"


def step_times(cfg: RLConfig, arch: Architecture, node: Node, learners: int, kv_tokens: int, handoff: int) -> dict[str, float]:
    """Seconds per step, estimated (module docstring): learner, sampling, handoff."""
    sequences = cfg.prompts_per_step * cfg.group_size
    T = seq_len(cfg)
    flops = (6 if cfg.is_full else 4) * arch.params * sequences * T
    learn_s = flops / (node.peak_flops * MFU * learners)
    c = compute_bytes(cfg.dtype, node.cuda)
    in_flight = max(1, min(sequences, 256, kv_tokens // max(T, 1)))
    per_iteration = (c * arch.params / cfg.tensor_parallel_size + in_flight * (T / 2) * c * arch.kv_bytes_per_token) / (node.bandwidth * BANDWIDTH_EFFICIENCY)
    sample_s = per_iteration * cfg.max_tokens * -(-sequences // in_flight)
    handoff_s = handoff / (10e9 if node.cuda else 2e9)  # the engine's weight loading (~10 GB/s on a GPU), not the link, bounds it
    return {"learn_s": learn_s, "sample_s": sample_s, "handoff_s": handoff_s, "step_s": learn_s + sample_s + handoff_s}


# ------------------------------------------------------------------------------------ checks and fixes


def suggestion(cfg: RLConfig, node: Node, learners: int | None) -> str:
    """A one-key change that fits, tried in order of least effect on the experiment; "" if none does."""
    candidates: list[dict[str, object]] = []
    if cfg.is_full and cfg.learner_parallel != "fsdp" and (learners or node.gpus) > 1:
        candidates.append({"learner_parallel": "fsdp"})
    if cfg.is_full and cfg.learner_parallel == "fsdp" and cfg.fsdp_grad_reduce == "step":
        candidates.append({"fsdp_grad_reduce": "micro_batch"})
    candidates += [{"micro_batch": mb} for mb in (cfg.micro_batch // 2, cfg.micro_batch // 4, 2, 1) if 1 <= mb < cfg.micro_batch]
    if node.cuda:
        candidates += [{"gpu_memory_utilization": g} for g in (0.3, 0.25, 0.2, 0.4, 0.5) if g != cfg.gpu_memory_utilization]
        candidates += [{"placement": p} for p in ("sleep", "split") if p != cfg.placement]
    for change in candidates:
        try:
            changed = dataclasses.replace(cfg, **change)  # type: ignore[arg-type]  # keys and values from the lists above
        except ConfigError:
            continue
        if plan_run(changed, node, learners).fits:
            return ", ".join(f"{k}={v}" for k, v in change.items())
    return ""


class PlanError(ConfigError):
    """The run cannot fit on its devices; the message names the key to change."""


def check_fits(cfg: RLConfig, node: Node, learners: int | None = None, what: str = "") -> Plan:
    """The plan, or PlanError naming the config key and a value that fits (before any weight loads)."""
    plan = plan_run(cfg, node, learners)
    if plan.fits:
        return plan
    key, why = plan.problems[0]
    fix = suggestion(cfg, node, learners)
    hint = f"; {fix} fits" if fix else ""
    where = f"{what}: " if what else ""
    raise PlanError(f"{where}config key {key!r}: {why}{hint} (see `rlora plan`)")


def check_before_loading(cfg: RLConfig, device: str, world_size: int) -> Plan | None:
    """`rlora rl`'s check on this machine, before any weight loads: the run's learner processes on the visible devices."""
    if os.environ.get("RLORA_SKIP_PLAN") == "1":  # an escape hatch for a model the plan gets wrong; say so in the run's log
        return None
    return check_fits(cfg, this_node(device), learners=world_size if device.startswith("cuda") else 1)


# ------------------------------------------------------------------------------------ printing


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def table(plan: Plan) -> str:
    """The plan as markdown: one row per device, then the handoff and time per step."""
    cfg, arch, node = plan.config, plan.arch, plan.node
    where = f"{node.gpus} x {gib(node.device_memory)} GiB GPU" if node.cuda else f"host with {gib(node.device_memory)} GiB"
    arm = "FullFT" + (f" (fsdp over {plan.learners})" if cfg.learner_parallel == "fsdp" else "") if cfg.is_full else f"LoRA rank {cfg.rank}"
    lines = [
        f"{arch.name}: {arch.params / 1e9:.2f}B parameters, {arm}, dtype {cfg.dtype}, placement {cfg.placement}, on {where}, {plan.learners} learner process(es)",
        f"micro-batch {min(cfg.micro_batch, -(-cfg.prompts_per_step * cfg.group_size // plan.learners))} rows x {plan.seq_len} tokens "
        f"({cfg.max_tokens} completion); engine KV cache {plan.kv_tokens} tokens",
        "",
        "| device (GiB) | weights | gradients | optimizer | activations | logits | engine weights | engine other | KV cache | peak | capacity | fits |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d in plan.devices:
        lm = d.learner
        learner_cells = [gib(lm.weights), gib(lm.gradients), gib(lm.optimizer), gib(lm.activations), gib(lm.logits)] if lm else ["-"] * 5
        engine_cells = [gib(d.engine_weights), gib(d.engine_other), gib(max(d.kv_cache, 0))] if d.engine else ["-"] * 3
        ok = "yes" if d.peak <= d.capacity else "**no**"
        lines.append(f"| {d.name} | " + " | ".join([*learner_cells, *engine_cells, gib(d.peak), gib(d.capacity), ok]) + " |")
    t = plan.times
    lines += [
        "",
        f"handoff: {plan.handoff_bytes / 1e9:.3f} GB per step ({'full weights' if cfg.is_full else 'adapter'}, {cfg.dtype})",
        f"time per step (estimate): learner {t['learn_s']:.0f} s, sampling {t['sample_s']:.0f} s, handoff {t['handoff_s']:.2f} s, "
        f"step {t['step_s']:.0f} s; {cfg.max_steps} steps {t['step_s'] * cfg.max_steps / 3600:.1f} h",
    ]
    if plan.fits:
        lines.append("fits: yes")
    else:
        lines += [f"fits: NO: config key {key!r}: {why}" for key, why in plan.problems]
        fix = suggestion(cfg, node, plan.learners)
        if fix:
            lines.append(f"change: {fix} fits")
    return "\n".join(lines) + "\n"


def plan_json(plan: Plan) -> str:
    devices = [{"name": d.name, "peak": d.peak, "capacity": d.capacity, **(dataclasses.asdict(d.learner) if d.learner else {})} for d in plan.devices]
    return json.dumps({"fits": plan.fits, "devices": devices, "handoff_bytes": plan.handoff_bytes, "times": plan.times, "problems": plan.problems}, indent=2)


def load_rl_config(path: str | Path, overrides: Sequence[str] = ()) -> RLConfig:
    from rlora.config import load_config

    return load_config(RLConfig, path, list(overrides))
