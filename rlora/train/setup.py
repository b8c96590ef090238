"""Building a learner from a config and carrying it across checkpoints: shared by RL, rl-multi and SFT.

The LoRA spec and the learner spec are built here and nowhere else, from `TrainConfig`'s fields.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rlora.config import RLConfig, TrainConfig
from rlora.runs import RunDir
from rlora.train import lora
from rlora.train.learner import Learner, LearnerHandle, LearnerSpec


def lora_spec(cfg: TrainConfig) -> lora.LoRASpec | None:
    """The adapter `cfg` asks for; None for full fine-tuning."""
    if cfg.is_full:
        return None
    targets = lora.TARGETS_ALL_LINEAR if cfg.lora_targets == "all-linear" else tuple(t.strip() for t in cfg.lora_targets.split(","))
    assert isinstance(cfg.rank, int)
    return lora.LoRASpec(rank=cfg.rank, alpha_rule=cfg.alpha_rule, alpha_c=cfg.alpha_c, init=cfg.lora_init, init_scale=cfg.lora_init_scale, targets=targets)


def learner_spec(cfg: TrainConfig, model_path: str, device: str) -> LearnerSpec:
    """The learner `cfg` asks for, on `device`, with `cfg.dtype` already resolved (rlora.devices)."""
    assert cfg.dtype != "auto", "resolve the dtype first (rlora.devices.resolve_precision)"
    return LearnerSpec(
        model_path=model_path,
        lora=lora_spec(cfg),
        lr=cfg.lr,
        lr_b_mult=cfg.lr_b_mult,
        weight_decay=cfg.weight_decay,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        grad_clip=cfg.grad_clip,
        device=device,
        dtype=cfg.dtype,
        micro_batch=cfg.micro_batch,
        seed=cfg.seed,
        fsdp_grad_reduce=cfg.fsdp_grad_reduce,
        # an RL KL penalty on FullFT needs the initial weights kept (LoRA switches its adapter off instead)
        keep_reference=isinstance(cfg, RLConfig) and cfg.kl_coef > 0 and cfg.is_full,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_latest(run: RunDir, learner: Learner) -> int:
    """Load the run's last checkpoint (if any) into the learner; the next step."""
    start_step = 0
    checkpoint = run.latest_checkpoint()
    if checkpoint is not None:
        start_step, state = RunDir.load_checkpoint(checkpoint)
        learner.load_state(state)
    return start_step


def restore(run: RunDir, learner: Learner) -> int:
    """Load the run's last checkpoint (if any) into the learner; drop metrics rows written after it; the next step."""
    start_step = load_latest(run, learner)
    run.truncate_metrics(start_step)  # drop rows written after the checkpoint by a killed run
    return start_step


def is_checkpoint_due(cfg: TrainConfig, next_step: int) -> bool:
    """Checkpoint once `next_step` steps are done: every `checkpoint_every` steps and after the last one."""
    return bool(cfg.checkpoint_every) and (next_step % cfg.checkpoint_every == 0 or next_step == cfg.max_steps)


def save_if_due(run: RunDir, cfg: TrainConfig, learner: LearnerHandle, next_step: int) -> None:
    """Checkpoint the learner (and its PEFT adapter for LoRA) once `next_step` steps are done, when due."""
    if is_checkpoint_due(cfg, next_step):
        extra: dict[str, Callable[[Path], None]] = {"adapter": learner.write_adapter} if learner.spec.lora is not None else {}
        run.save_checkpoint(next_step, learner.state(), extra, keep=cfg.keep_checkpoints, snapshot_dtype=cfg.dtype)
