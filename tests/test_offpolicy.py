"""The learner side of off-policy RL on a tiny random Llama: several optimizer steps per batch
(the default still one, bit for bit), the KL penalty toward the reference policy (LoRA with its
adapter off, FullFT's frozen initial weights) against a hand computation, the new losses through
the learner, and ratio statistics split by staleness."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import random_groups
from transformers import AutoModelForCausalLM

from rlora.config import RLConfig
from rlora.rl.advantages import center
from rlora.rl.batching import build_batch, minibatches
from rlora.rl.losses import LossSpec, kl_k3
from rlora.rl.steps import learn, loss_spec
from rlora.rl.types import TrainBatch
from rlora.train import lora
from rlora.train.distributed import shard_batch
from rlora.train.learner import Learner, LearnerSpec


def _batch(seed: int = 0) -> TrainBatch:
    batch = build_batch(random_groups(seed), center, pad_id=0)
    assert batch is not None
    return batch


def _spec(path: str, arm: str, **kw: object) -> LearnerSpec:
    lora_spec = lora.LoRASpec(rank=2) if arm == "lora" else None  # default init: B = 0, the model starts at its base
    return LearnerSpec(model_path=path, lora=lora_spec, lr=1e-2 if arm == "lora" else 1e-3, dtype="float32", micro_batch=5, seed=0, **kw)


def _cfg(arm: str, **kw: object) -> RLConfig:
    return RLConfig(rank=2 if arm == "lora" else "full", temperature=0.8, **kw)


def _trainable(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}


class Recorder:
    """A LearnerHandle that records each `train_step` and passes it on."""

    def __init__(self, learner: Learner) -> None:
        self.learner, self.spec = learner, learner.spec
        self.calls: list[tuple[TrainBatch, LossSpec, float]] = []

    def train_step(self, batch: TrainBatch, spec: LossSpec, norm: float) -> dict[str, float]:
        self.calls.append((batch, spec, norm))
        return self.learner.train_step(batch, spec, norm)


# ------------------------------------------------------------------------------------ steps per batch


@pytest.mark.parametrize("arm", ["lora", "full"])
def test_default_learn_is_exactly_one_train_step_on_the_whole_batch(tiny_model_path, arm):
    """num_substeps = num_minibatches = 1, kl_coef = 0: the single step of before, bit for bit."""
    cfg = _cfg(arm)
    a, b = Learner(_spec(tiny_model_path, arm)), Learner(_spec(tiny_model_path, arm))
    assert a.reference is None  # no KL penalty: no copy of the weights
    stats, tokens = learn(a, random_groups(), cfg, pad_id=0)
    batch = _batch()
    expected = b.train_step(batch, LossSpec(loss="tis", cap=2.0, temperature=0.8), float(batch.num_tokens))
    assert tokens == batch.num_tokens
    assert stats == {**expected, "staleness_mean": 0.0, "staleness_max": 0.0}
    assert expected["masked_frac"] == expected["clipped_frac"] == 0.0 and "kl_ref" not in expected
    assert all(torch.equal(x, y) for x, y in zip(_trainable(a).values(), _trainable(b).values()))


def test_minibatches_and_substeps_take_one_step_each_with_their_own_norm(tiny_model_path):
    cfg = _cfg("lora", num_substeps=2, num_minibatches=3, loss="ppo_clip", seed=7)
    recorder = Recorder(Learner(_spec(tiny_model_path, "lora")))
    stats, tokens = learn(recorder, random_groups(version=4), cfg, pad_id=0)
    batch = _batch()
    assert len(recorder.calls) == 6 and tokens == batch.num_tokens
    assert all(norm == mb.num_tokens for mb, _, norm in recorder.calls)  # N per minibatch
    assert [mb.num_tokens for mb, _, _ in recorder.calls[:3]] != [mb.num_tokens for mb, _, _ in recorder.calls[3:]]  # reshuffled
    # the same split again from (seed, version), stepped by hand: the same weights
    by_hand = Learner(_spec(tiny_model_path, "lora"))
    for mb in minibatches(batch, 3, 2, np.random.default_rng([7, 4])):
        by_hand.train_step(mb, loss_spec(cfg), float(mb.num_tokens))
    assert all(torch.equal(x, y) for x, y in zip(_trainable(recorder.learner).values(), _trainable(by_hand).values()))
    assert 0 < stats["clipped_frac"] <= 1 and stats["masked_frac"] == 0  # made-up sampler logprobs: ratios far from 1


def test_constant_norm_is_shared_out_over_the_minibatches(tiny_model_path):
    cfg = _cfg("lora", num_minibatches=4, loss_norm="constant", loss_norm_constant=100.0)
    recorder = Recorder(Learner(_spec(tiny_model_path, "lora")))
    learn(recorder, random_groups(), cfg, pad_id=0)
    assert [norm for _, _, norm in recorder.calls] == [25.0] * 4


# ------------------------------------------------------------------------------------ KL toward the reference


def test_adapter_disabled_is_the_base_model_and_nests(tiny_model_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    lora.apply_lora(model, lora.LoRASpec(rank=2, init="gaussian_ab"), generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        adapted, plain = model(input_ids=ids).logits, base(input_ids=ids).logits
        assert not torch.allclose(adapted, plain)
        with lora.adapter_disabled(model):
            assert torch.equal(model(input_ids=ids).logits, plain)
            with lora.adapter_disabled(model):
                pass
            assert torch.equal(model(input_ids=ids).logits, plain)  # the inner context restored "off"
        assert torch.equal(model(input_ids=ids).logits, adapted)


def _hand_reference_lp(path: str, batch: TrainBatch, temperature: float) -> torch.Tensor:
    """log p(target) under a freshly loaded model (the initial policy), from full logits."""
    fresh = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    attention = (torch.arange(batch.tokens_B_T.shape[1])[None] < batch.lengths_B[:, None]).long()
    with torch.no_grad():
        logprobs = (fresh(input_ids=batch.tokens_B_T, attention_mask=attention).logits / temperature).log_softmax(-1)
    return logprobs.gather(-1, batch.targets_B_T[..., None]).squeeze(-1)[batch.mask_B_T.bool()]


@pytest.mark.parametrize("arm", ["lora", "full"])
def test_kl_is_exactly_zero_at_step_0_and_matches_a_hand_computation_after_steps(tiny_model_path, arm):
    spec = LossSpec(loss="tis", cap=2.0, temperature=0.8, kl_coef=0.5)
    learner = Learner(_spec(tiny_model_path, arm, keep_reference=arm == "full"))
    assert (learner.reference is not None) == (arm == "full")  # LoRA keeps no copy: its reference is the adapter off
    batch = _batch()
    seen = learner.backward(batch, spec, float(batch.num_tokens))
    assert torch.equal(seen.kl_ref_N, torch.zeros_like(seen.kl_ref_N))  # learner == reference at step 0
    with_kl = [p.grad.clone() for p in learner.trainable]
    learner.backward(batch, dataclasses.replace(spec, kl_coef=0.0), float(batch.num_tokens))
    assert all(torch.equal(g, p.grad) for g, p in zip(with_kl, learner.trainable))  # k3's gradient 1 - p_ref/p is 0 there too
    for seed in range(3):
        stats = learner.train_step(_batch(seed), spec, float(_batch(seed).num_tokens))
    assert stats["kl_ref"] > 0
    seen = learner.backward(batch, spec, float(batch.num_tokens))
    expected_N = kl_k3(seen.learner_lp_N, _hand_reference_lp(tiny_model_path, batch, 0.8))
    assert expected_N.mean() > 1e-5  # the weights moved
    assert torch.allclose(seen.kl_ref_N, expected_N, rtol=1e-4, atol=1e-6)


def test_kl_coef_zero_runs_no_reference_forward(tiny_model_path, monkeypatch):
    learner = Learner(_spec(tiny_model_path, "lora"))

    def no(*args: object) -> None:
        raise AssertionError("reference forward with kl_coef = 0")

    monkeypatch.setattr(learner, "reference_logprobs", no)
    stats = learner.train_step(_batch(), LossSpec(loss="seq_mask", temperature=0.8), 10.0)
    assert "kl_ref" not in stats and 0 < stats["masked_frac"] <= 1


def test_full_kl_without_a_kept_reference_fails_clearly(tiny_model_path):
    learner = Learner(_spec(tiny_model_path, "full"))
    with pytest.raises(AssertionError, match="keep_reference"):
        learner.train_step(_batch(), LossSpec(loss="tis", kl_coef=0.1), 10.0)


@pytest.mark.parametrize(
    "spec", [LossSpec(loss="seq_mask", seq_mask_delta=0.5, kl_coef=0.1), LossSpec(loss="ppo_clip", kl_coef=0.1)], ids=["seq_mask", "ppo_clip"]
)
def test_new_losses_shard_like_the_whole_batch(tiny_model_path, spec):
    """The distributed identity for the new losses: a sequence never straddles shards or micro-batches."""
    learner = Learner(_spec(tiny_model_path, "lora"))
    learner.train_step(_batch(1), spec, 10.0)  # move off the reference, so the KL term has a gradient
    batch = _batch()
    whole_pass = learner.backward(batch, spec, float(batch.num_tokens))
    whole = [p.grad.clone() for p in learner.trainable]
    summed = [torch.zeros_like(p) for p in learner.trainable]
    masked = 0
    for rank in range(3):
        masked += int(learner.backward(shard_batch(batch, rank, 3), spec, float(batch.num_tokens)).masked_N.sum())
        for acc, p in zip(summed, learner.trainable):
            acc += p.grad
    assert masked == int(whole_pass.masked_N.sum())
    assert all(torch.allclose(w, s, atol=1e-7) for w, s in zip(whole, summed))


# ------------------------------------------------------------------------------------ staleness


def test_ratio_stats_split_by_staleness(tiny_model_path):
    groups = random_groups(0, version=5, num_prompts=2) + random_groups(1, version=3, num_prompts=2)
    learner = Learner(_spec(tiny_model_path, "lora"))
    stats, _ = learn(learner, groups, _cfg("lora"), pad_id=0, current_version=5)
    assert stats["staleness_mean"] == 1.0 and stats["staleness_max"] == 2.0
    assert {"ratio_mean_s0", "ratio_mean_s2", "kl_sample_train_s0", "kl_sample_train_s2"} <= set(stats) and "ratio_mean_s1" not in stats
    assert min(stats["ratio_mean_s0"], stats["ratio_mean_s2"]) <= stats["ratio_mean"] <= max(stats["ratio_mean_s0"], stats["ratio_mean_s2"])
    no_signal = [dataclasses.replace(g, rollouts=g.rollouts[:1]) for g in groups]
    stats, tokens = learn(learner, no_signal, _cfg("lora"), pad_id=0, current_version=6)
    assert tokens == 0 and stats["staleness_max"] == 3.0 and stats["masked_frac"] == 0.0 and "kl_ref" not in stats
    stats, _ = learn(learner, no_signal, _cfg("lora", kl_coef=0.1), pad_id=0, current_version=6)
    assert np.isnan(stats["kl_ref"])  # not measured, but the column is there
