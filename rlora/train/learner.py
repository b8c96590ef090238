"""The learner: the only holder of mutable torch state (weights, optimizer).

LoRA and FullFT share this class; they differ only in which parameters train and in what is
handed to the sampler (an adapter directory, or the full weights).

Precision: master weights and LoRA factors stay float32 and AdamW updates them in float32;
with `dtype=bfloat16` the forward and backward run under autocast, like the bf16 engine the
rollouts came from. For LoRA the frozen base is stored in bf16 (it never changes), which is what
makes a rank-1 learner several times lighter than FullFT.

Memory: rows are processed in micro-batches and the vocabulary projection runs only at
completion positions, so the (tokens x 49k) logits are never built for prompt tokens.

A step is `backward` (gradients from zero) then `optimizer_step` (clip, AdamW); `rlora.train.distributed`
puts a cross-rank gradient sum between the two and merges the ranks' `BackwardPass`es with
`step_stats`. A single process makes no distributed call.

Reference policy (a KL penalty, `LossSpec.kl_coef` > 0): the initial policy. For LoRA it is the
same model with every adapter switched off (`lora.adapter_disabled`: no second copy of the
weights; with an init that starts at the base, B = 0, that is the initial policy exactly). For
FullFT it is a frozen copy of the initial weights, kept only when `LearnerSpec.keep_reference`.
With kl_coef = 0 no reference forward runs.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from rlora.rl.losses import LossInputs, LossSpec, objective, ratio_stats, staleness_ratio_stats
from rlora.rl.types import PushedWeights, TrainBatch
from rlora.train import lora

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class LearnerSpec:
    model_path: str
    lora: lora.LoRASpec | None  # None: full fine-tuning
    lr: float
    lr_b_mult: float = 1.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    device: str = "cpu"
    dtype: str = "bfloat16"
    micro_batch: int = 16
    seed: int = 0
    fsdp_grad_reduce: str = "step"  # FSDP only: reduce-scatter once per step (step) or after every micro-batch
    keep_reference: bool = False  # FullFT with a KL penalty: keep a frozen copy of the initial weights (LoRA switches its adapter off)


def load_policy(spec: LearnerSpec) -> nn.Module:
    """The HF causal LM with LoRA applied (or fully trainable), on its device."""
    from transformers import AutoModelForCausalLM

    if spec.dtype not in DTYPES:
        raise ValueError(f"config key 'dtype' must be one of {sorted(DTYPES)}, got {spec.dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=torch.float32)
    return prepare_policy(model, spec)


def prepare_policy(model: nn.Module, spec: LearnerSpec) -> nn.Module:
    """A float32 causal LM made into the policy: LoRA applied (base in compute precision) or all trainable, on its device."""
    if spec.lora is not None:
        model.to(DTYPES[spec.dtype])  # frozen base in compute precision
        # Our own generator: an in-process vLLM engine reseeds the global RNGs.
        generator = torch.Generator().manual_seed(spec.seed)
        lora.apply_lora(model, spec.lora, generator=generator)
    model.to(spec.device)
    model.config.use_cache = False
    return model


def make_optimizer(model: nn.Module, spec: LearnerSpec) -> torch.optim.Optimizer:
    if spec.lora is not None:
        a_params, b_params = lora.lora_parameters(model)
        groups = [{"params": a_params, "lr": spec.lr}, {"params": b_params, "lr": spec.lr * spec.lr_b_mult}]
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": spec.lr}]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)


ClipFn = Callable[[list[nn.Parameter], float], torch.Tensor | float]


@dataclass(frozen=True, kw_only=True)
class BackwardPass:
    """What one backward pass saw, kept for the step's statistics (one per rank when distributed)."""

    loss: float  # sum of the micro-batches' losses, each already divided by the step's N
    learner_lp_N: torch.Tensor  # (N,) learner logprobs of the completion tokens, detached
    sampler_lp_N: torch.Tensor  # (N,) the sampler's logprobs of the same tokens
    entropy_N: torch.Tensor  # (N,) learner entropy at those positions
    masked_N: torch.Tensor  # (N,) bool, the loss dropped the token's sequence
    clipped_N: torch.Tensor  # (N,) bool, the loss clipped the token's ratio
    staleness_N: torch.Tensor  # (N,) int64, the token's row's staleness
    kl_ref_N: torch.Tensor  # (N,) k3 toward the reference; (0,) without a KL penalty

    def cpu(self) -> BackwardPass:
        """The same pass with every tensor on the CPU (to gather it across ranks)."""
        tensors = {k: v.cpu() for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return BackwardPass(loss=self.loss, **tensors)

    @staticmethod
    def concat(parts: list[BackwardPass]) -> BackwardPass:
        """Micro-batches' passes as one: losses summed, tokens concatenated in order."""
        tensors = {k: torch.cat([getattr(p, k) for p in parts]) for k, v in vars(parts[0]).items() if isinstance(v, torch.Tensor)}
        return BackwardPass(loss=sum(p.loss for p in parts), **tensors)


def step_stats(passes: list[BackwardPass], grad_norm: float, spec: LossSpec) -> dict[str, float]:
    """The step's statistics over every pass's tokens (one pass, or every rank's shard)."""

    def cat(field: str) -> torch.Tensor:
        return torch.cat([getattr(p, field).cpu() for p in passes])

    learner_lp_N, sampler_lp_N = cat("learner_lp_N"), cat("sampler_lp_N")
    stats = {
        "loss": sum(p.loss for p in passes),
        "grad_norm": grad_norm,
        "entropy": cat("entropy_N").mean().item(),
        **ratio_stats(learner_lp_N, sampler_lp_N, spec.cap),
        "masked_frac": cat("masked_N").float().mean().item(),
        "clipped_frac": cat("clipped_N").float().mean().item(),
    }
    if spec.kl_coef > 0:
        stats["kl_ref"] = cat("kl_ref_N").mean().item()
    return {**stats, **staleness_ratio_stats(learner_lp_N, sampler_lp_N, cat("staleness_N"))}


def per_token(x_b: torch.Tensor, mask_b_T: torch.Tensor) -> torch.Tensor:
    """A per-row value (b,) at each masked position, in the order `x_B_T[mask]` takes them: (N,)."""
    return x_b[:, None].expand_as(mask_b_T)[mask_b_T.bool()]


class LearnerHandle(Protocol):
    """What the RL loop, the handoff and checkpoints use of a learner: a `Learner` in one process,
    or rank 0's `rlora.train.distributed.LeaderLearner`, which announces each collective call."""

    spec: LearnerSpec

    def train_step(self, batch: TrainBatch, spec: LossSpec, norm: float) -> dict[str, float]: ...

    def sequence_logprobs(self, token_ids: list[int]) -> list[float]: ...

    def weights(self) -> Iterable[tuple[str, torch.Tensor]] | PushedWeights: ...

    def write_adapter(self, path: Path) -> None: ...

    def adapter_tensors(self) -> dict[str, torch.Tensor]: ...

    def state(self) -> dict[str, object]: ...

    def empty_cache(self) -> None: ...

    def init_weight_transfer(self, backend: str, engine_workers: int, client: object | None) -> None: ...


class Learner:
    def __init__(self, spec: LearnerSpec, model: nn.Module | None = None) -> None:
        """`model`: the policy as `load_policy(spec)` would build it, when the caller built it (rlora.rl.multi shares a base)."""
        self.spec = spec
        self.model = load_policy(spec) if model is None else model
        self.optimizer = make_optimizer(self.model, spec)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.transfer: object | None = None  # vLLM's trainer-side weight transfer engine, when attached
        # FullFT's reference policy: the weights as loaded, before any step or checkpoint moves them
        self.reference = copy.deepcopy(self.model).requires_grad_(False) if spec.keep_reference and spec.lora is None else None

    # ---------------------------------------------------------------- forward

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        dtype = DTYPES[self.spec.dtype]
        device_type = torch.device(self.spec.device).type
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=dtype)

    def token_logprobs(
        self, tokens_B_T: torch.Tensor, targets_B_T: torch.Tensor, mask_B_T: torch.Tensor, lengths_B: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(target) at masked positions, entropy there), both (N,), logits divided by T."""
        return self._token_logprobs(self.model, tokens_B_T, targets_B_T, mask_B_T, lengths_B, temperature)

    @torch.no_grad()
    def reference_logprobs(
        self, tokens_B_T: torch.Tensor, targets_B_T: torch.Tensor, mask_B_T: torch.Tensor, lengths_B: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """log p_ref(target) at masked positions (N,): LoRA with its adapters off, or FullFT's frozen initial weights."""
        if self.spec.lora is not None:
            with lora.adapter_disabled(self.model):
                return self.token_logprobs(tokens_B_T, targets_B_T, mask_B_T, lengths_B, temperature)[0]
        assert self.reference is not None, "a FullFT KL penalty needs LearnerSpec.keep_reference (set from kl_coef > 0)"
        return self._token_logprobs(self.reference, tokens_B_T, targets_B_T, mask_B_T, lengths_B, temperature)[0]

    def _token_logprobs(
        self, model: nn.Module, tokens_B_T: torch.Tensor, targets_B_T: torch.Tensor, mask_B_T: torch.Tensor, lengths_B: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.spec.device
        tokens_B_T, targets_B_T, mask_B_T = tokens_B_T.to(device), targets_B_T.to(device), mask_B_T.to(device)
        T = tokens_B_T.shape[1]
        attention_B_T = (torch.arange(T, device=device)[None, :] < lengths_B.to(device)[:, None]).long()
        with self._autocast():
            hidden_B_T_H = model.get_decoder()(input_ids=tokens_B_T, attention_mask=attention_B_T).last_hidden_state
            on_N = mask_B_T.bool()
            head = model.get_output_embeddings()
            logits_N_V = head(self._head_input(hidden_B_T_H[on_N]))
        logprobs_N_V = (logits_N_V.float() / temperature).log_softmax(-1)
        lp_N = logprobs_N_V.gather(-1, targets_B_T[on_N][:, None]).squeeze(-1)
        with torch.no_grad():
            entropy_N = -(logprobs_N_V.exp() * logprobs_N_V).sum(-1)
        return lp_N, entropy_N

    def _head_input(self, hidden_N_H: torch.Tensor) -> torch.Tensor:
        """The output layer's input; a sharded learner casts it where the layer runs in another dtype."""
        return hidden_N_H

    def _before_backward(self, last: bool) -> None:
        """Before each micro-batch's backward (`last`: the step's final one); a sharded learner delays its reduction."""

    @torch.no_grad()
    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(token_t | tokens_<t) for t >= 1 at temperature 1 (the handoff probe)."""
        tokens_1_T = torch.tensor([token_ids])
        targets_1_T = torch.roll(tokens_1_T, -1, dims=1)
        mask_1_T = torch.ones_like(tokens_1_T, dtype=torch.float32)
        mask_1_T[0, -1] = 0
        lp_N, _ = self.token_logprobs(tokens_1_T, targets_1_T, mask_1_T, torch.tensor([len(token_ids)]), 1.0)
        return lp_N.tolist()

    # ---------------------------------------------------------------- update

    def train_step(self, batch: TrainBatch, spec: LossSpec, norm: float) -> dict[str, float]:
        """One optimizer step over the whole batch, in micro-batches; returns the step's statistics."""
        seen = self.backward(batch, spec, norm)
        grad_norm = self.optimizer_step()
        return step_stats([seen], grad_norm, spec)

    def backward(self, batch: TrainBatch, spec: LossSpec, norm: float) -> BackwardPass:
        """Gradients of the batch's loss from zero, in micro-batches (`rlora.train.distributed` passes one rank's rows).

        `norm` is the step's N over the whole batch, so the gradients of disjoint row sets add up
        to the gradient of their union. A sequence never spans two micro-batches, so a loss that
        looks at whole sequences (seq_mask) sees each one whole.
        """
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        B = batch.tokens_B_T.shape[0]
        parts: list[BackwardPass] = []
        for start in range(0, B, self.spec.micro_batch):
            rows = slice(start, start + self.spec.micro_batch)
            T = int(batch.lengths_B[rows].max())  # crop padding to this micro-batch's longest row
            mask_b_T = batch.mask_B_T[rows, :T]
            inputs_b_T = (batch.tokens_B_T[rows, :T], batch.targets_B_T[rows, :T], mask_b_T, batch.lengths_B[rows], spec.temperature)
            lp_N, entropy_N = self.token_logprobs(*inputs_b_T)
            on = mask_b_T.bool()
            x = LossInputs(
                learner_lp_N=lp_N,
                sampler_lp_N=batch.sampler_logprobs_B_T[rows, :T][on].to(lp_N.device),
                adv_N=per_token(batch.advantages_B[rows], mask_b_T).to(lp_N.device),
                seq_id_N=per_token(torch.arange(mask_b_T.shape[0]), mask_b_T).to(lp_N.device),
                num_seqs=mask_b_T.shape[0],
                ref_lp_N=self.reference_logprobs(*inputs_b_T) if spec.kl_coef > 0 else None,
            )
            terms = objective(x, spec)
            loss = terms.terms_N.sum() / norm
            self._before_backward(last=start + self.spec.micro_batch >= B)
            loss.backward()
            parts.append(
                BackwardPass(
                    loss=loss.item(),
                    learner_lp_N=lp_N.detach(),
                    sampler_lp_N=x.sampler_lp_N,
                    entropy_N=entropy_N,
                    masked_N=terms.masked_N,
                    clipped_N=terms.clipped_N,
                    staleness_N=per_token(batch.staleness_B[rows], mask_b_T),
                    kl_ref_N=terms.kl_ref_N if terms.kl_ref_N is not None else lp_N.new_zeros(0),
                )
            )
        return BackwardPass.concat(parts)

    def optimizer_step(self, clip_fn: ClipFn = torch.nn.utils.clip_grad_norm_) -> float:
        """Clip the gradient to `grad_clip` global norm, step; the norm before clipping.

        `clip_fn`: a sharded learner (FSDP2) passes one that reduces the norm across ranks.
        """
        clip = self.spec.grad_clip if self.spec.grad_clip > 0 else float("inf")
        grad_norm = clip_fn(self.trainable, clip)
        self.optimizer.step()
        return float(grad_norm)

    # ---------------------------------------------------------------- handoff and checkpoints

    def write_adapter(self, path: Path) -> None:
        """The PEFT adapter in the engine's dtype: the engine casts to it anyway, and bf16 halves the bytes."""
        assert self.spec.lora is not None
        lora.save_peft_adapter(self.model, self.spec.lora, path, base_model=self.spec.model_path, dtype=DTYPES[self.spec.dtype])

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """LoRA A and B (float32 masters, detached) as `<module path>.lora_A` / `.lora_B`: what the handoff verifies."""
        assert self.spec.lora is not None
        out: dict[str, torch.Tensor] = {}
        for name, m in lora.lora_modules(self.model).items():
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = m.lora_A.detach(), m.lora_B.detach()
        return out

    def weights(self) -> Iterable[tuple[str, torch.Tensor]] | PushedWeights:
        """Full weights in checkpoint names (tied lm_head appears once, as the embedding); with an
        in-memory transfer attached, a `PushedWeights` the sampler triggers instead."""
        if self.transfer is not None:
            return PushedWeights(self.push_weights, self.handoff_nbytes())
        return ((name, param.detach()) for name, param in self.model.named_parameters())

    def init_weight_transfer(self, backend: str, engine_workers: int, client: object | None) -> None:
        """Attach vLLM's in-memory weight transfer (rlora.engine.weight_sync) for FullFT handoffs; every rank
        (`client`: the engine's, on rank 0; None on the others, which never reach the engine)."""
        from rlora.engine.weight_sync import FollowerClient, model_source, trainer_engine

        assert self.spec.lora is None, "LoRA hands off adapter files"
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        source = model_source(self.model, DTYPES[self.spec.dtype])
        self.transfer = trainer_engine(backend, rank, client if client is not None else FollowerClient(), source, engine_workers)

    def push_weights(self) -> None:
        """One transfer round: every rank materialises its parameters, rank 0 drives the engine's workers."""
        assert self.transfer is not None
        self.transfer.send_weights()  # type: ignore[attr-defined]  # vLLM's TrainerWeightTransferEngine

    def handoff_nbytes(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) * DTYPES[self.spec.dtype].itemsize

    def empty_cache(self) -> None:
        """Give the CUDA blocks this process cached but no longer uses back to the driver (before a sleeping engine wakes)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def handoff(self) -> Callable[[Path], None] | Iterable[tuple[str, torch.Tensor]] | PushedWeights:
        return self.write_adapter if self.spec.lora is not None else self.weights()

    def state(self) -> dict[str, object]:
        return {
            "trainable": {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad},
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state(self, state: dict[str, object]) -> None:
        trainable = state["trainable"]
        assert isinstance(trainable, dict)
        params = dict(self.model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in trainable]
        if missing:
            raise ValueError(f"checkpoint lacks trainable parameters, e.g. {missing[0]!r}: rank or targets changed?")
        with torch.no_grad():
            for name, value in trainable.items():
                if name not in params or params[name].shape != value.shape:
                    raise ValueError(f"checkpoint parameter {name!r} does not fit this model")
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
