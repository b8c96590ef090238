"""Real engine, real default model: handoff, zero adapter, one step of each arm, kill and resume.

Float32 engine and learner where a tight probe is needed (they agree to ~1e-4 per token), tiny
workloads everywhere else. Each test starts its own in-process engine (a few seconds on CPU).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import rlora.rl.loop as loop
from rlora.config import RLConfig, load_config
from rlora.engine.sampler import EngineSpec, Sampler
from rlora.rl.handoff import HandoffError, make_probe, publish
from rlora.rl.loop import run_rl
from rlora.train.learner import Learner, LearnerSpec
from rlora.train.lora import LoRASpec, lora_parameters
from rlora.train.models import resolve_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = ["prompts_per_step=2", "group_size=4", "max_tokens=12", "kv_cache_gib=1", "micro_batch=8"]


@pytest.fixture(scope="module")
def model_path() -> str:
    return resolve_model("default")


def _close(sampler: Sampler) -> None:
    sampler.close()
    gc.collect()


def test_lora_handoff_zero_adapter_and_stale_detection(model_path):
    learner = Learner(LearnerSpec(model_path=model_path, lora=LoRASpec(rank=1), lr=1e-3, dtype="float32"))
    sampler = Sampler(EngineSpec(model_path=model_path, device="cpu", dtype="float32", lora_rank=1, max_num_seqs=8))
    try:
        probe = make_probe(sampler.tokenizer, "float32")
        base_lp = np.array(sampler.prompt_logprobs(probe.token_ids))
        # v0: B = 0, the adapter must reproduce the base model exactly
        publish(learner, sampler, 0, probe)
        np.testing.assert_allclose(sampler.prompt_logprobs(probe.token_ids), base_lp, atol=1e-6)
        # v1: a real change reaches the engine: sampler moves away from base, onto the learner
        with torch.no_grad():
            for b in lora_parameters(learner.model)[1]:
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        stats = publish(learner, sampler, 1, probe)
        new_lp = np.array(sampler.prompt_logprobs(probe.token_ids))
        assert np.abs(new_lp - base_lp).mean() > 0.05
        assert stats["probe_gap"] < 2e-3 and stats["probe_shift"] > 0.05 and stats["handoff_s"] < 0.5
        # a stale engine (handoff silently skipped) is caught, by the fingerprints first (tests/test_verify_engine.py: every fault)
        with torch.no_grad():
            for b in lora_parameters(learner.model)[1]:
                b.mul_(-1)
        sampler.load_adapter = lambda write, version: None  # type: ignore[method-assign]
        with pytest.raises(HandoffError, match=r"policy v2: the engine does not serve the learner's adapter: worker 0"):
            publish(learner, sampler, 2, probe)
    finally:
        _close(sampler)


def test_full_weights_handoff(model_path):
    learner = Learner(LearnerSpec(model_path=model_path, lora=None, lr=1e-5, dtype="float32"))
    sampler = Sampler(EngineSpec(model_path=model_path, device="cpu", dtype="float32", lora_rank=None, max_num_seqs=8))
    try:
        probe = make_probe(sampler.tokenizer, "float32")
        base_lp = np.array(sampler.prompt_logprobs(probe.token_ids))
        with torch.no_grad():
            w = learner.model.model.layers[3].mlp.down_proj.weight
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        stats = publish(learner, sampler, 1, probe)
        assert np.abs(np.array(sampler.prompt_logprobs(probe.token_ids)) - base_lp).mean() > 0.01
        assert stats["probe_gap"] < 2e-3
        # the tied embedding / output layer: vLLM's reload left lm_head on the old embedding
        # (a 0.45 nats/token gap) until rlora.engine.sampler.WorkerExtension.retie_word_embeddings
        with torch.no_grad():
            e = learner.model.get_input_embeddings().weight
            e.add_(torch.randn(e.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
        stats = publish(learner, sampler, 2, probe)
        assert stats["probe_shift"] > 0.1 and stats["probe_gap"] < 2e-3
    finally:
        _close(sampler)


# off-policy: several clipped steps per batch with a KL penalty (FullFT: setup keeps the frozen reference copy)
OFF_POLICY = ["loss=ppo_clip", "num_substeps=2", "num_minibatches=2", "kl_coef=0.05"]


@pytest.mark.parametrize(
    ("rank", "extra"), [("1", []), ("full", []), ("1", OFF_POLICY), ("full", OFF_POLICY)], ids=["lora", "full", "lora_off_policy", "full_off_policy"]
)
def test_one_step_end_to_end(rank, extra, tmp_path):
    lr = "1e-3" if rank == "1" else "1e-5"
    cfg = load_config(RLConfig, None, TINY + [f"rank={rank}", f"lr={lr}", "max_steps=1", "checkpoint_every=1", f"run_dir={tmp_path}", *extra])
    run = run_rl(cfg, progress=False)
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [0]
    for key in (
        "reward_mean",
        "signal_groups",
        "loss",
        "ratio_mean",
        "ratio_max",
        "truncated_frac",
        "kl_sample_train",
        "entropy",
        "tokens",
        "sample_s",
        "grade_s",
        "learn_s",
        "handoff_s",
        "probe_gap",
        "masked_frac",
        "clipped_frac",
        "staleness_max",
    ):
        assert key in rows[0], key
    assert rows[0]["staleness_max"] == 0 and ("kl_ref" in rows[0]) == bool(extra)
    assert ("ratio_mean_s0" in rows[0]) == (rows[0]["signal_groups"] > 0)  # tokens trained on, all from the current policy
    assert 0.0 <= rows[0]["reward_mean"] <= 1.0 and rows[0]["tokens"] > 0
    assert rows[0]["probe_gap"] < 0.1
    ckpt = run.latest_checkpoint()
    assert ckpt is not None and (ckpt / "trainable.pt").exists() and (ckpt / "optimizer.pt").exists()
    assert (ckpt / "adapter" / "adapter_config.json").exists() == (rank == "1")
    assert json.loads((tmp_path / "config.json").read_text())["rank"] == (1 if rank == "1" else "full")


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_fullft_probe_rides_in_the_sampling_call_and_stops_the_run_before_training(tmp_path, monkeypatch, max_staleness):
    """FullFT: each handoff's probe is scored by the engine as one more request of the next sampling
    call, not by a call of its own; only the last 1 + k handoffs (no sampling follows) probe by themselves.
    A policy that scores the probe wrongly (what fingerprints cannot see, e.g. a transposed load;
    injected here into the engine's scores at v2) stops the run in that sampling call: no batch v2
    sampled is trained, and no row is logged after step 1."""
    own_calls: list[int] = []
    real_prompt_logprobs, real_sample_scoring = Sampler.prompt_logprobs, Sampler.sample_scoring

    def counted(self: Sampler, token_ids: list[int], *args: object, **kwargs: object) -> list[float]:
        own_calls.append(self.version)
        return real_prompt_logprobs(self, token_ids, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Sampler, "prompt_logprobs", counted)
    base = TINY + ["rank=full", "lr=1e-5", "dtype=float32", "checkpoint_every=0", f"max_staleness={max_staleness}"]
    rows = run_rl(load_config(RLConfig, None, base + ["max_steps=3", f"run_dir={tmp_path / 'ok'}"]), progress=False).read_metrics()
    # the others were scored inside sampling calls; with k = 1 the last batch was sampled before v2 existed
    assert own_calls == list(range(3 - max_staleness, 4))
    assert all(r["probe_gap"] < 2e-3 for r in rows) and [r["step"] for r in rows] == [0, 1, 2]

    def wrong_at_v2(self: Sampler, *args: object, **kwargs: object) -> tuple[object, list[float] | None]:
        groups, scored = real_sample_scoring(self, *args, **kwargs)  # type: ignore[arg-type]
        if scored is not None and self.version == 2:
            scored = [lp - 0.5 for lp in scored]
        return groups, scored

    monkeypatch.setattr(Sampler, "sample_scoring", wrong_at_v2)
    trained_from: list[int] = []  # the policy versions that sampled the batches the learner trained
    real_learn = loop.learn

    def recording_learn(handle: object, groups_P: list, cfg: RLConfig, pad_id: int, current_version: int | None = None) -> tuple[dict[str, float], int]:
        trained_from.extend(g.policy_version for g in groups_P)
        return real_learn(handle, groups_P, cfg, pad_id, current_version)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "learn", recording_learn)
    with pytest.raises(HandoffError, match=r"policy v2: sampler and learner disagree on the probe"):
        run_rl(load_config(RLConfig, None, base + ["max_steps=4", f"run_dir={tmp_path / 'bad'}"]), progress=False)
    assert 2 not in trained_from and trained_from  # with k = 1 batch 2 (sampled by v1) may be trained; nothing v2 sampled is
    assert [json.loads(line)["step"] for line in (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()] == [0, 1]


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_kill_and_resume_has_each_step_once(tmp_path, max_staleness):
    """SIGKILL after two steps (with max_staleness 1 a batch is in flight then), resume: each step once."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlora.cli", "rl", *TINY, "rank=1", "lr=1e-3", "max_steps=4", "checkpoint_every=1", f"run_dir={run_dir}"]
    cmd += [f"max_staleness={max_staleness}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up
    proc.wait()
    done = subprocess.run([sys.executable, "-m", "rlora.cli", "rl", "--resume", str(run_dir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["staleness_max"] <= max_staleness for r in rows)
