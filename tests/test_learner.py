"""Learner tests on a tiny random Llama: the fast logprob path against a full-logits reference,
micro-batch invariance of the gradient, and which parameters a LoRA or FullFT step moves."""

from __future__ import annotations

import pytest
import torch
from conftest import random_groups

from rlora.rl.advantages import center
from rlora.rl.batching import build_batch
from rlora.rl.losses import LossSpec
from rlora.train.learner import Learner, LearnerSpec
from rlora.train.lora import LoRASpec


def _batch(seed: int = 0):
    batch = build_batch(random_groups(seed), center, pad_id=0)
    assert batch is not None
    return batch


def _learner(path, lora, micro_batch=16, dtype="float32", lr=1e-2):
    return Learner(LearnerSpec(model_path=path, lora=lora, lr=lr, dtype=dtype, micro_batch=micro_batch, seed=0))


def test_fast_logprobs_match_full_logits_reference(tiny_model_path):
    learner = _learner(tiny_model_path, LoRASpec(rank=2, init="gaussian_ab"))
    batch = _batch()
    T = 0.7
    lp_N, entropy_N = learner.token_logprobs(batch.tokens_B_T, batch.targets_B_T, batch.mask_B_T, batch.lengths_B, T)
    attention = (torch.arange(batch.tokens_B_T.shape[1])[None] < batch.lengths_B[:, None]).long()
    with torch.no_grad():
        logits = learner.model(input_ids=batch.tokens_B_T, attention_mask=attention).logits
    ref_all = (logits.float() / T).log_softmax(-1)
    on = batch.mask_B_T.bool()
    ref = ref_all.gather(-1, batch.targets_B_T[..., None]).squeeze(-1)[on]
    assert torch.allclose(lp_N.detach(), ref, atol=1e-5)
    ref_entropy = -(ref_all.exp() * ref_all).sum(-1)[on]
    assert torch.allclose(entropy_N, ref_entropy, atol=1e-4)


def test_probe_logprobs_match_sequence_forward(tiny_model_path):
    learner = _learner(tiny_model_path, None)
    ids = [5, 9, 17, 33, 2]
    with torch.no_grad():
        logits = learner.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    ref = [logits[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
    assert learner.sequence_logprobs(ids) == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("lora", [LoRASpec(rank=1, init="gaussian_ab"), None], ids=["lora_r1", "full"])
def test_gradient_does_not_depend_on_micro_batch(tiny_model_path, lora):
    batch = _batch()
    grads = []
    for micro in (1, 5, 64):
        learner = _learner(tiny_model_path, lora, micro_batch=micro)
        learner.optimizer.step = lambda: None  # keep the gradients, skip the update
        learner.train_step(batch, LossSpec(loss="tis", cap=2.0, temperature=1.0), norm=float(batch.num_tokens))
        grads.append(torch.cat([p.grad.flatten() for p in learner.trainable]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)


def test_lora_step_moves_only_the_adapter(tiny_model_path):
    learner = _learner(tiny_model_path, LoRASpec(rank=1))
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    stats = learner.train_step(_batch(), LossSpec(loss="tis", cap=2.0, temperature=1.0), norm=10.0)
    for key in ("loss", "grad_norm", "entropy", "ratio_mean", "ratio_max", "truncated_frac", "kl_sample_train"):
        assert key in stats
    changed = {n for n, p in learner.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at 0 and must leave it


def test_full_step_moves_the_weights(tiny_model_path):
    learner = _learner(tiny_model_path, None, lr=1e-3)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    learner.train_step(_batch(), LossSpec(loss="tis", cap=2.0, temperature=1.0), norm=10.0)
    changed = [n for n, p in learner.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    names = [n for n, _ in learner.weights()]
    assert "model.embed_tokens.weight" in names and len(names) == len(set(names))


def test_state_roundtrip(tiny_model_path):
    a = _learner(tiny_model_path, LoRASpec(rank=1))
    a.train_step(_batch(), LossSpec(loss="tis", cap=2.0, temperature=1.0), norm=10.0)
    b = _learner(tiny_model_path, LoRASpec(rank=1))
    b.load_state(a.state())
    for (n, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), n
    with pytest.raises(ValueError, match="trainable"):
        _learner(tiny_model_path, LoRASpec(rank=2)).load_state({"trainable": {}, "optimizer": {}})
