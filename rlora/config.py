"""Flat, frozen configs: YAML presets plus `key=value` overrides, checked loudly.

A preset in `configs/` is a flat mapping of the same fields as the dataclass. Unknown keys and
values of the wrong type fail with an error that names the key (and the file). The resolved
config is saved as `config.json` in the run directory, and `--resume` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and where it came from."""


# The valid values of every choice field, checked when a config is built, before anything loads.
# Each list is the key set of the registry that implements it (a test keeps them equal):
# rlora.train.lora.ALPHA_RULES / INITS, rlora.rl.advantages.ADVANTAGES, rlora.rl.losses.LOSSES /
# NORMALIZERS, rlora.train.distributed.LEARNERS, rlora.devices.DTYPES (+ "auto"), rlora.tracking.TRACKERS,
# rlora.data.PROMPT_FORMATS (+ "auto").
CHOICES: dict[str, tuple[str, ...]] = {
    "alpha_rule": ("constant", "per_rank", "sqrt"),
    "lora_init": ("default", "gaussian", "gaussian_ab"),
    "dtype": ("auto", "bfloat16", "float32", "float16"),
    "advantage": ("center", "center_std"),
    "loss": ("is", "tis", "reinforce", "seq_mask", "ppo_clip"),
    "loss_norm": ("tokens", "constant"),
    "placement": ("colocate", "split", "sleep"),
    "learner_parallel": ("ddp", "fsdp"),
    "task": ("arith", "arith_chain", "gsm8k", "math"),
    "reward_policy": ("default", "strict"),
    "prompt_format": ("auto", "chat", "plain", "fewshot"),
    "fsdp_grad_reduce": ("step", "micro_batch"),
    "weight_transfer": ("auto", "file", "ipc", "nccl"),
}
REPORT_TO = ("tensorboard", "wandb")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The fields every training entry point shares: model, LoRA, optimizer, run, device, tracking.

    `RLConfig` and `SFTConfig` extend it; YAML presets stay flat (the same keys at one level).
    """

    # model and parametrization
    model: str = "default"  # "default" (offline SmolLM2-135M-Instruct), a local folder, or a Hub name
    rank: int | str = 1  # LoRA rank >= 1, or "full" for full fine-tuning
    alpha_rule: str = "constant"  # constant | per_rank | sqrt (see rlora.train.lora.ALPHA_RULES)
    alpha_c: float | None = None  # the rule's constant; None = the rule's default (alpha = 32 at r = 32)
    lora_init: str = "default"  # default (A uniform, B = 0) | gaussian | gaussian_ab
    lora_init_scale: float = 1.0
    lora_targets: str = "all-linear"  # "all-linear" or a comma list of module names (q_proj,v_proj,...)
    # optimizer (AdamW, constant learning rate, as in the blog)
    lr: float = 1e-4
    lr_b_mult: float = 1.0  # learning rate of LoRA B over that of A
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    micro_batch: int = 16  # sequences per forward/backward; bounds learner memory, not the result
    # learner_parallel=fsdp: step = one reduce-scatter per step (unsharded float32 gradients accumulate over the
    # micro-batches: 4 bytes/param on every rank) | micro_batch = after each micro-batch (sharded gradients, more traffic)
    fsdp_grad_reduce: str = "step"
    # run
    max_steps: int = 20
    seed: int = 0
    run_dir: str = ""  # "" = runs/<preset>-<time>
    checkpoint_every: int = 5  # 0 = none; else every N steps and after the last one
    keep_checkpoints: int = 1  # full states (weights, optimizer, RNG) kept; older checkpoints keep an evaluation snapshot in `dtype`
    eval_every: int = 0  # evaluate every N steps (RL: benchmarks, 0 = off; SFT: held-out loss)
    report_to: str = ""  # "" | tensorboard | wandb | tensorboard,wandb: stream metrics rows there too
    # devices and precision
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # engine weights and learner compute (learner master weights stay float32). auto = bfloat16
    # where the device computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else
    # float32; the run dir's config.json holds the resolved value (rlora.devices.resolve_dtype).
    dtype: str = "auto"

    def __post_init__(self) -> None:
        check_rank(self.rank)
        for key, valid in CHOICES.items():
            if hasattr(self, key) and getattr(self, key) not in valid:
                raise ConfigError(f"config key {key!r} must be one of {list(valid)}, got {getattr(self, key)!r}")
        for tracker in filter(None, (t.strip() for t in self.report_to.split(","))):
            if tracker not in REPORT_TO:
                raise ConfigError(f"config key 'report_to' takes a comma list of {list(REPORT_TO)}, got {self.report_to!r}")
        if self.micro_batch < 1:
            raise ConfigError(f"config key 'micro_batch' must be >= 1, got {self.micro_batch!r}")
        if self.lr <= 0:
            raise ConfigError(f"config key 'lr' must be > 0, got {self.lr!r}")
        if self.max_steps < 0 or self.checkpoint_every < 0:
            raise ConfigError("config keys 'max_steps' and 'checkpoint_every' must be >= 0")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"config key 'keep_checkpoints' must be >= 1 (the latest full state resumes the run), got {self.keep_checkpoints!r}")

    @property
    def is_full(self) -> bool:
        return self.rank == "full"


@dataclass(frozen=True, kw_only=True)
class RLConfig(TrainConfig):
    """Everything one RL run needs. Defaults run the CPU demo (rank-1 LoRA, synthetic arithmetic)."""

    # data
    task: str = "arith"  # arith | arith_chain | gsm8k | math (see rlora.data.TRAIN_TASKS)
    train_data: str = ""  # local JSONL in the Hub schema, or a Hub dataset name; "" = the task's default
    arith_max: int = 9  # synthetic arithmetic (arith, arith_chain): operands drawn from 1..arith_max
    # arith_chain: operands per question, joined by + and - (the task and its held-out benchmark `arith_chain`;
    # docs/study_rl_cpu.md calibrates arith_max and arith_terms for the default model)
    arith_terms: int = 3
    reward_policy: str = "default"  # how rewards finds the final answer: default | strict (boxed only); see rewards
    # how a question becomes a prompt (rlora.data.PROMPT_FORMATS): auto = chat where the tokenizer has a chat
    # template, else plain | chat | plain (Question:/Answer:, for base models) | fewshot (4 worked examples, then plain)
    prompt_format: str = "auto"
    # sampling
    prompts_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 64
    temperature: float = 1.0
    # asynchronous RL: the sampler may run up to this many policy versions ahead of the learner (0 = synchronous:
    # sample, learn, hand off, in turn). A batch is trained at most max_staleness versions after the policy that
    # sampled it; the importance weight p_learner / p_sampler corrects for the lag (rlora.rl.loop.run_steps).
    max_staleness: int = 0
    # loss
    advantage: str = "center"  # center | center_std (see rlora.rl.advantages.ADVANTAGES)
    loss: str = "tis"  # is | tis | reinforce | seq_mask | ppo_clip (see rlora.rl.losses.LOSSES)
    is_cap: float = 2.0  # C of truncated importance sampling (tis, seq_mask)
    # seq_mask: drop a sequence whose mean per-token log(p_learner / p_sampler) leaves [-delta, delta]. 0.5 (a
    # geometric-mean ratio outside [0.61, 1.65]) is hundreds of times the bf16 sampler/learner mismatch
    # (kl_sample_train ~1e-3) and far above a few steps' policy drift, yet a single outlier token cannot trip it
    # on a 5-token completion (as a tight band would): it drops only sequences from a clearly different policy.
    seq_mask_delta: float = 0.5
    clip_eps: float = 0.2  # ppo_clip: r = p_learner / p_sampler is clipped to [1 - clip_eps, 1 + clip_eps_high] (PPO's 0.2)
    clip_eps_high: float | None = None  # None = clip_eps (symmetric); DAPO's clip-higher uses 0.28
    # KL penalty toward the initial policy (LoRA: adapter off; FullFT: a frozen copy, kept only when > 0), k3
    # estimator per token (rlora.rl.losses). 0 = none, as in the blog, and no reference forward at all.
    kl_coef: float = 0.0
    loss_norm: str = "tokens"  # tokens | constant (see rlora.rl.losses.NORMALIZERS)
    loss_norm_constant: float = 0.0  # N for loss_norm=constant; 0 = prompts * group * max_tokens (divided by num_minibatches)
    # optimizer steps per batch: num_substeps passes, each over num_minibatches shuffled sets of whole sequences
    # (num_substeps * num_minibatches steps; the normaliser N is per minibatch). 1, 1 = one step, on-policy (the blog).
    num_substeps: int = 1
    num_minibatches: int = 1
    # engine
    kv_cache_gib: float = 1.0  # vLLM KV cache on CPU (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float = 0.35  # vLLM's share of GPU memory when colocated with the learner
    max_model_len: int = 1024
    probe_tol: float = 0.0  # handoff probe tolerance (nats/token); 0 = calibrated at the first handoff (rlora.rl.handoff.Probe)
    # FullFT on CPU: vLLM packs each linear weight into an opaque GEMM, read back by multiplying identity rows
    # (~2 s for the 135M model on 2 cores). Each handoff reads back this share of every packed GEMM's input
    # columns and of the embedding's, drawn afresh (norms, adapters and GPU weights are always fingerprinted
    # whole); the run's first handoff and every `fingerprint_full_every`-th version read back all of them
    # (1 = every handoff). A stale or partial handoff leaves whole tensors old: 36 of 576 columns see it.
    fingerprint_fraction: float = 0.0625
    fingerprint_full_every: int = 20
    # scaling out (rlora.train.placement, rlora.train.distributed; README "Scaling out")
    placement: str = "colocate"  # colocate | split (sampler and learner on separate GPUs) | sleep (colocate + vLLM sleep mode)
    tensor_parallel_size: int = 1  # the sampler's vLLM tensor parallelism (GPUs, or CPU core groups)
    learner_parallel: str = "ddp"  # with several learner processes (torchrun): ddp (replicas) | fsdp (FSDP2 shards, FullFT)
    # FullFT handoff to an engine in its own process (rlora.engine.weight_sync): auto (ipc when colocated, nccl under
    # split, a file on CPU) | file | ipc | nccl. An engine in the learner's process reads the tensors directly.
    weight_transfer: str = "auto"
    # evaluation during training (eval_every: 0 = off)
    eval_benchmarks: str = "math500,gsm8k"
    eval_limit: int = 50
    eval_data_dir: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = ("prompts_per_step", "group_size", "max_tokens", "max_model_len", "arith_max", "tensor_parallel_size", "num_substeps", "num_minibatches")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(self, key)!r}")
        if self.arith_terms < 2:
            raise ConfigError(f"config key 'arith_terms' must be >= 2 (operands per arith_chain question), got {self.arith_terms!r}")
        if self.max_staleness < 0:
            raise ConfigError(f"config key 'max_staleness' must be >= 0 (0 = synchronous), got {self.max_staleness!r}")
        if self.max_staleness and self.placement == "sleep":
            raise ConfigError("config key 'max_staleness': placement sleep puts the engine to sleep while the learner runs, so they cannot overlap; use 0")
        if not 0 < self.fingerprint_fraction <= 1:
            raise ConfigError(f"config key 'fingerprint_fraction' must be in (0, 1], got {self.fingerprint_fraction!r}")
        if self.fingerprint_full_every < 1:
            raise ConfigError(f"config key 'fingerprint_full_every' must be >= 1, got {self.fingerprint_full_every!r}")
        if self.temperature <= 0:
            raise ConfigError("config key 'temperature' must be > 0 (the importance ratio needs a sampling distribution)")
        if self.learner_parallel == "fsdp" and not self.is_full:
            raise ConfigError("config key 'learner_parallel': fsdp shards full fine-tuning (rank=full); LoRA runs replicate with ddp")
        for key in ("is_cap", "seq_mask_delta"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"config key {key!r} must be > 0, got {getattr(self, key)!r}")
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"config key 'clip_eps' must be in (0, 1) (the ratio is clipped at 1 - clip_eps > 0), got {self.clip_eps!r}")
        if self.clip_eps_high is not None and self.clip_eps_high <= 0:
            raise ConfigError(f"config key 'clip_eps_high' must be > 0 or null (= clip_eps), got {self.clip_eps_high!r}")
        if self.kl_coef < 0:
            raise ConfigError(f"config key 'kl_coef' must be >= 0, got {self.kl_coef!r}")
        if self.kl_coef > 0 and self.learner_parallel == "fsdp":
            raise ConfigError("config key 'kl_coef' > 0 needs a frozen reference copy, which learner_parallel=fsdp does not shard yet; use ddp")


def check_rank(rank: int | str) -> None:
    if rank == "full":
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"config key 'rank' must be an integer >= 1 or 'full', got {rank!r}")


C = TypeVar("C", bound="TrainConfig")


def _coerce(key: str, value: object, annotation: object, where: str) -> object:
    """Check `value` against a field annotation (int, float, str, bool, X | None, int | str)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {**vars(typing), "None": None})  # `from __future__ import annotations`
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"config key {key!r}{where} may not be null")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if option is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"config key {key!r}{where} must be {names}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type[C], data: dict[str, object], where: str = "") -> C:
    """Build a config from a flat mapping; unknown keys and wrong types raise ConfigError."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}{where}; known keys: {', '.join(sorted(known))}")
    values = {k: _coerce(k, v, known[k].type, where) for k, v in data.items()}
    return cls(**values)  # type: ignore[arg-type]  # each value was checked against its field by _coerce


def parse_overrides(overrides: list[str]) -> dict[str, object]:
    """`key=value` strings; values are read as YAML scalars (1e-4, true, full, null)."""
    out: dict[str, object] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
    return out


def load_yaml(path: str | Path) -> dict[str, object]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or any(isinstance(v, (dict, list)) for v in data.values()):
        raise ConfigError(f"config file {path} must be a flat mapping of key: scalar")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    data: dict[str, object] = {}
    if path is not None:
        data.update(load_yaml(path))
        from_dict(cls, data, where=f" in {path}")  # fail on the file's own keys first, naming the file
    data.update(parse_overrides(overrides or []))
    return from_dict(cls, data, where=" (from the command line)" if overrides else "")


def to_dict(cfg: TrainConfig) -> dict[str, object]:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def read_config(cls: type[C], path: Path) -> C:
    return from_dict(cls, json.loads(path.read_text()), where=f" in {path}")
