"""Asynchronous RL (config `max_staleness`): the scheduling of `rlora.rl.loop.run_steps` with a
fake engine and learner (the bound under a slow learner and a slow sampler, the order of events
at k = 0, errors), then the real engine: k = 0 reproduces the synchronous loop step for step, and
a stale batch's importance weights are the ratio between the learner's current policy and the
policy that sampled it, recomputed by the learner from that version."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import rlora.rl.loop as loop
from rlora.config import ConfigError, RLConfig, load_config
from rlora.rl.handoff import Probe
from rlora.rl.loop import Sampled, run_steps
from rlora.rl.steps import NO_SIGNAL_STATS, staleness_stats
from rlora.rl.types import Group, Prompt, Rollout
from rlora.runs import create_run

HANG_GUARD_S = 600  # a stalled pipeline fails the test instead of hanging it (not a speed budget)


def _group(version: int) -> Group:
    prompt = Prompt(problem_id="p", question="q", prompt_ids=(1, 2), reference="3", reward_task="number")
    rollouts = tuple(Rollout(prompt_ids=(1, 2), completion_ids=(3,), sampler_logprobs=(-0.5,), reward=r, text="3", finish_reason="stop") for r in (0.0, 1.0))
    return Group(prompt=prompt, rollouts=rollouts, policy_version=version)


class FakeEngine:
    """What run_steps uses of a Sampler; `publish` (patched) sets the version it serves."""

    def __init__(self) -> None:
        self.version = 0
        self.tokenizer = type("Tok", (), {"pad_token_id": 0})()
        self.handoff_bytes = 0

    @contextlib.contextmanager
    def asleep(self, before_wake: Callable[[], object]) -> Iterator[None]:
        yield


class Pipeline:
    """run_steps with the engine, the learner and the handoff replaced by fakes that record events.

    `learner_gate(trained)` / `sampler_gate(step)` return when the fake learner may finish its
    `trained`-th batch / the fake sampler may finish batch `step`: an artificially slow side,
    expressed as a condition on the other side rather than a sleep, so no outcome depends on speed."""

    def __init__(self, tmp_path: Path, k: int, steps: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cfg = load_config(RLConfig, None, [f"max_staleness={k}", f"max_steps={steps}", "checkpoint_every=0", f"run_dir={tmp_path / 'run'}"])
        self.run = create_run(self.cfg, "async", "rl")
        self.engine = FakeEngine()
        self.events: list[tuple[str, int, int]] = []  # (what, step or version, served version)
        self.started = 0  # sampling calls begun
        self.sampled = 0
        self.trained = 0
        self.learner_threads: set[int] = set()
        self.changed = threading.Condition()
        self.learner_gate: Callable[[int], bool] = lambda trained: True
        self.sampler_gate: Callable[[int], bool] = lambda step: True
        self.probe = Probe([0], floor=1e-3)
        monkeypatch.setattr(loop, "sample_step", self.sample_step)
        monkeypatch.setattr(loop, "learn", self.learn)
        monkeypatch.setattr(loop, "publish", self.publish)

    def _wait(self, ready: Callable[[], bool]) -> None:
        with self.changed:
            assert self.changed.wait_for(ready, timeout=HANG_GUARD_S), f"stalled; events {self.events}"

    def sample_step(self, sampler: FakeEngine, problems: object, step: int, cfg: RLConfig, probe: Probe) -> Sampled:
        with self.changed:
            self.started += 1
            self.changed.notify_all()
        self._wait(lambda: self.sampler_gate(step))
        with self.changed:
            if probe.pending is not None:  # the deferred handoff probe rides in this sampling call
                self.events.append(("probe", probe.pending[0], self.engine.version))
                probe.pending = None
            self.events.append(("sample", step, self.engine.version))
            self.sampled += 1
            self.changed.notify_all()
        return Sampled(step=step, groups_P=[_group(self.engine.version)], version=self.engine.version, sample_s=0.0, grade_s=0.0)

    def learn(self, handle: object, groups_P: list[Group], cfg: RLConfig, pad_id: int, current_version: int | None = None) -> tuple[dict[str, float], int]:
        self.learner_threads.add(threading.get_ident())
        self._wait(lambda: self.learner_gate(self.trained))
        with self.changed:
            self.events.append(("learn", self.trained, groups_P[0].policy_version))
            self.trained += 1
            self.changed.notify_all()
        return {**NO_SIGNAL_STATS, **staleness_stats(groups_P, current_version if current_version is not None else -1)}, 0

    def publish(self, handle: object, sampler: FakeEngine, version: int, probe: Probe, *, defer_probe: bool = False) -> dict[str, float]:
        with self.changed:
            assert probe.pending is None, f"v{version} handed off before v{probe.pending[0]}'s probe was scored"
            self.events.append(("publish", version, self.engine.version))
            self.engine.version = version
            if defer_probe:
                probe.pending = (version, np.zeros(1))
            else:
                self.events.append(("probe", version, version))  # scored by the handoff itself
            self.changed.notify_all()
        return {"handoff_s": 0.0, "verify_s": 0.0}

    def go(self) -> list[dict[str, object]]:
        self.engine.version = 0
        self.publish(None, self.engine, 0, self.probe, defer_probe=True)  # as `train` hands off the initial policy
        self.events.clear()
        run_steps(self.cfg, self.run, SimpleNamespace(empty_cache=lambda: None), self.engine, self.probe, [], {}, 0, progress=False)  # type: ignore[arg-type]
        self.run.close()
        return self.run.read_metrics()


@pytest.mark.parametrize("k", [1, 2])
def test_slow_learner_the_sampler_runs_exactly_k_versions_ahead(tmp_path, monkeypatch, k):
    pipe = Pipeline(tmp_path, k, steps=7, monkeypatch=monkeypatch)
    # the learner finishes batch t only once the sampler can go no further: the sampler is never the bottleneck
    pipe.learner_gate = lambda trained: pipe.sampled >= min(trained + k + 1, 7)
    rows = pipe.go()
    assert [r["step"] for r in rows] == list(range(7))
    assert [r["staleness_max"] for r in rows] == [min(s, k) for s in range(7)]
    for what, step, served in pipe.events:
        if what == "sample":
            assert step - served <= k, pipe.events  # never sampled further ahead than the bound
    assert threading.get_ident() not in pipe.learner_threads  # the learner ran on its own thread
    assert all(r["sampler_wait_s"] >= 0 and r["learner_wait_s"] >= 0 for r in rows)
    each_version_probed_once(pipe.events, 7)


def each_version_probed_once(events: list[tuple[str, int, int]], steps: int) -> None:
    """Every policy version's handoff probe is scored once, by the engine serving that version, and
    the next handoff waits for it (the fake publish asserts that)."""
    probes = [(v, served) for what, v, served in events if what == "probe"]
    assert [v for v, _ in probes] == list(range(steps + 1)), events
    assert all(v == served for v, served in probes), events


def test_slow_sampler_the_learner_waits_and_batches_stay_one_version_old(tmp_path, monkeypatch):
    """The sampler finishes batch n only after the learner trained batch n-1: the learner waits for
    every batch, and the handoff of v(n) waits for the sampling call in progress (one thread owns the
    engine), so batch n comes from v(n-1): staleness 1, within the bound."""
    pipe = Pipeline(tmp_path, 1, steps=5, monkeypatch=monkeypatch)
    pipe.learner_gate = lambda trained: pipe.started >= min(trained + 2, 5)  # the sampler is busy when the learner finishes
    pipe.sampler_gate = lambda step: pipe.trained >= step
    rows = pipe.go()
    assert [r["staleness_max"] for r in rows] == [0, 1, 1, 1, 1]
    assert [e for e in pipe.events if e[0] == "sample"] == [("sample", s, max(s - 1, 0)) for s in range(5)]
    each_version_probed_once(pipe.events, 5)


def test_k0_is_the_synchronous_loop(tmp_path, monkeypatch):
    pipe = Pipeline(tmp_path, 0, steps=3, monkeypatch=monkeypatch)
    rows = pipe.go()
    expected = []
    for s in range(3):
        expected += [("probe", s, s), ("sample", s, s), ("learn", s, s), ("publish", s + 1, s)]
    assert pipe.events == expected + [("probe", 3, 3)]  # no sampling call follows the last handoff: probed by itself
    assert pipe.learner_threads == {threading.get_ident()}  # k = 0: the learner runs in turn, on this thread
    assert [r["staleness_max"] for r in rows] == [0, 0, 0]


def test_a_learner_error_stops_the_run_and_logs_nothing_after_it(tmp_path, monkeypatch):
    pipe = Pipeline(tmp_path, 1, steps=5, monkeypatch=monkeypatch)
    real_learn = pipe.learn

    def failing(handle: object, groups_P: list[Group], cfg: RLConfig, pad_id: int, current_version: int | None = None) -> tuple[dict[str, float], int]:
        if pipe.trained == 2:
            raise RuntimeError("out of memory in the learner")
        return real_learn(handle, groups_P, cfg, pad_id, current_version)

    monkeypatch.setattr(loop, "learn", failing)
    with pytest.raises(RuntimeError, match="out of memory in the learner"):
        pipe.go()
    assert [r["step"] for r in pipe.run.read_metrics()] == [0, 1]


def test_max_staleness_config_errors():
    with pytest.raises(ConfigError, match="'max_staleness' must be >= 0"):
        load_config(RLConfig, None, ["max_staleness=-1"])
    with pytest.raises(ConfigError, match="'max_staleness': placement sleep"):
        load_config(RLConfig, None, ["max_staleness=1", "placement=sleep"])


# ------------------------------------------------------------------------------------ the real engine

TINY = ["prompts_per_step=2", "group_size=4", "max_tokens=12", "kv_cache_gib=1", "micro_batch=8", "dtype=float32"]


def reference_synchronous_rows(cfg: RLConfig) -> list[dict[str, object]]:
    """The loop as it was before `max_staleness`, from the same stages: sample, grade, learn, hand off, in turn."""
    from rlora.data import batch_for_step, load_task, make_prompt
    from rlora.engine.sampler import EngineSpec, Sampler
    from rlora.rl.handoff import judge_deferred, make_probe, publish
    from rlora.rl.steps import learn, reward_group, step_metrics
    from rlora.train.learner import Learner
    from rlora.train.models import resolve_model
    from rlora.train.setup import learner_spec, seed_everything

    seed_everything(cfg.seed)
    model_path = resolve_model(cfg.model)
    problems = load_task(cfg.task, cfg.train_data, cfg.arith_max, cfg.seed)
    learner = Learner(learner_spec(cfg, model_path, "cpu"))
    lora_rank = None if cfg.is_full else int(cfg.rank)
    spec = EngineSpec(
        model_path=model_path,
        device="cpu",
        dtype=cfg.dtype,
        lora_rank=lora_rank,
        kv_cache_gib=cfg.kv_cache_gib,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len,
        max_num_seqs=max(256, cfg.prompts_per_step * cfg.group_size),
        seed=cfg.seed,
    )
    sampler = Sampler(spec)
    probe = make_probe(sampler.tokenizer, cfg.dtype, cfg.probe_tol, cfg.prompt_format, cfg.fingerprint_fraction, cfg.fingerprint_full_every)
    publish(learner, sampler, 0, probe, defer_probe=True)  # FullFT: the engine scores the probe in the next sampling call
    rows = []
    try:
        for step in range(cfg.max_steps):
            prompts_P = [make_prompt(p, sampler.tokenizer, cfg.prompt_format) for p in batch_for_step(problems, step, cfg.prompts_per_step, cfg.seed)]
            score_ids = probe.token_ids if probe.pending is not None else None
            samples_P_G, probe_lp = sampler.sample_scoring(prompts_P, cfg.group_size, cfg.max_tokens, cfg.temperature, score_ids=score_ids)
            if probe_lp is not None:
                judge_deferred(probe, probe_lp, sampler.version)
            groups_P = [reward_group(p, s, sampler.version, cfg.reward_policy) for p, s in zip(prompts_P, samples_P_G)]
            stats, tokens = learn(learner, groups_P, cfg, sampler.tokenizer.pad_token_id or 0)
            publish(learner, sampler, step + 1, probe, defer_probe=step + 1 < cfg.max_steps)
            rows.append(step_metrics(step, groups_P, stats, tokens))
    finally:
        sampler.close()
        gc.collect()
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("rank", ["1", "full"])
def test_k0_reproduces_the_synchronous_run(tmp_path, rank):
    from rlora.rl.loop import run_rl

    lr = "1e-3" if rank == "1" else "3e-5"
    cfg = load_config(RLConfig, None, TINY + [f"rank={rank}", f"lr={lr}", "max_steps=3", "checkpoint_every=0", f"run_dir={tmp_path / 'run'}"])
    rows = run_rl(cfg, progress=False).read_metrics()
    reference = reference_synchronous_rows(cfg)
    keys = ("reward_mean", "signal_groups", "tokens", "train_tokens", "loss", "ratio_mean", "kl_sample_train")
    assert [{k: r[k] for k in keys} for r in rows] == [{k: r[k] for k in keys} for r in reference]
    assert [r["staleness_max"] for r in rows] == [0, 0, 0]


@pytest.mark.slow
def test_stale_batch_weights_are_the_ratio_to_the_sampling_policy(tmp_path, monkeypatch):
    """k = 1, rank-1 LoRA at a high lr: batch 1 was sampled by v0 and is trained at v1. Its importance
    weights exp(lp_learner - lp_sampler) must equal exp(lp_v1 - lp_v0), with lp_v0 recomputed by a
    learner holding v0 (the initial policy), and differ clearly from 1."""
    from rlora.rl.advantages import ADVANTAGES
    from rlora.rl.batching import build_batch
    from rlora.rl.loop import run_rl
    from rlora.train.learner import Learner
    from rlora.train.models import resolve_model
    from rlora.train.setup import learner_spec

    seen: list[dict[str, object]] = []
    real_learn = loop.learn

    def recording_learn(handle: Learner, groups_P: list[Group], cfg: RLConfig, pad_id: int, current_version: int | None = None) -> tuple[dict[str, float], int]:
        batch = build_batch(groups_P, ADVANTAGES[cfg.advantage], pad_id)
        if batch is not None:
            with torch.no_grad():
                current_N, _ = handle.token_logprobs(batch.tokens_B_T, batch.targets_B_T, batch.mask_B_T, batch.lengths_B, cfg.temperature)
            seen.append({"version": groups_P[0].policy_version, "batch": batch, "current_N": current_N})
        return real_learn(handle, groups_P, cfg, pad_id, current_version)

    monkeypatch.setattr(loop, "learn", recording_learn)
    overrides = ["rank=1", "lr=2e-2", "max_steps=3", "max_staleness=1", "checkpoint_every=0", "prompts_per_step=4", f"run_dir={tmp_path / 'run'}"]
    cfg = load_config(RLConfig, None, TINY + overrides)
    rows = run_rl(cfg, progress=False).read_metrics()
    assert [r["staleness_max"] for r in rows] == [0, 1, 1]
    stale = [s for s in seen if s["version"] == 0 and s is not seen[0]]
    assert stale, "no batch with signal was sampled by v0 and trained at v1"
    v0 = Learner(learner_spec(cfg, resolve_model(cfg.model), "cpu"))  # v0: the base model (LoRA B starts at zero)
    for s in stale:
        batch = s["batch"]
        on = batch.mask_B_T.bool()
        sampler_N = batch.sampler_logprobs_B_T[on]
        with torch.no_grad():
            old_N, _ = v0.token_logprobs(batch.tokens_B_T, batch.targets_B_T, batch.mask_B_T, batch.lengths_B, cfg.temperature)
        assert torch.allclose(sampler_N, old_N, atol=2e-3), (sampler_N - old_N).abs().max()  # the sampler held v0
        current_N = s["current_N"]
        assert (current_N - old_N).abs().mean() > 1e-3  # the policy really moved between sampling and training
        weights_N = torch.exp(current_N - sampler_N)
        assert torch.allclose(weights_N, torch.exp(current_N - old_N), rtol=5e-3)
    step1 = rows[1]
    assert "ratio_mean_s1" in step1 and "ratio_mean_s0" not in step1  # the ratio statistics, split by staleness
    if seen[1]["version"] == 0:  # the row's ratio statistics are those of the stale batch
        batch, current_N = seen[1]["batch"], seen[1]["current_N"]
        weights_N = torch.exp(current_N - batch.sampler_logprobs_B_T[batch.mask_B_T.bool()])
        assert step1["ratio_mean"] == pytest.approx(weights_N.mean().item(), rel=1e-4)
