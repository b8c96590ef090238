"""rl-multi: the multi-run file's checks, K learners on one base (the same update as alone, bit for
bit, and independent), and real engines (slow): K=2 adapters plus the base model mixed in one
batch, a K=2 run end to end with one sampling call per step, and a lockstep resume."""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path

import pytest
import torch
from test_learner import _batch  # tiny_model_path: a fixture of conftest.py

from rlora.cli import main as cli_main
from rlora.config import ConfigError
from rlora.rl.losses import LossSpec
from rlora.rl.multi import SHARED_KEYS, load_multi, resume_multi, run_multi, shared_base_learners
from rlora.runs import RunDir
from rlora.train import lora
from rlora.train.learner import Learner, LearnerSpec

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "multi.yaml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- the file


def test_runs_and_grid_name_the_runs_and_fixed_joins_overrides(tmp_path):
    multi = load_multi(
        _write(tmp_path, "out: o\nfixed: {max_steps: 3}\nruns:\n  - {rank: 1, lr: 1.0e-3}\n  - {rank: 8, seed: 1}\n"), overrides={"group_size": 2}
    )
    assert [p.name for p in multi.points] == ["rank=1,lr=0.001", "rank=8,seed=1"]
    cfgs = [p.config for p in multi.points]
    assert [c.max_steps for c in cfgs] == [3, 3] and [c.group_size for c in cfgs] == [2, 2]
    assert cfgs[1].run_dir == "o/rank=8,seed=1" and cfgs[1].lr == 1e-4  # the RLConfig default
    grid = load_multi(_write(tmp_path, "grid: {rank: [1, 8], lr: [1.0e-4, 1.0e-3]}\n"))
    assert len(grid.points) == 4 and grid.out == Path("runs/multi")
    preset = load_multi(REPO / "configs" / "rl_multi_cpu.yaml")
    assert sorted({p.config.rank for p in preset.points}) == [1, 8] and len(preset.points) == 4


@pytest.mark.parametrize(
    "text, message",
    [
        ("runs:\n  - {rank: 1}\n  - {rank: full, lr: 1.0e-5}\n", r"run 'rank=full,lr=1e-05'.*rank=full"),
        ("runs:\n  - {rank: 1}\n  - {rank: 8, max_tokens: 32}\n", r"'max_tokens' must be the same.*run 'rank=8,max_tokens=32' has 32"),
        ("runs:\n  - {rank: 1}\n  - {rank: 8, dtype: float32}\n", r"'dtype' must be the same"),
        ("runs:\n  - {rank: 1}\n  - {rank: 8, eval_every: 5}\n", r"run 'rank=8,eval_every=5'.*eval_every"),
        ("runs:\n  - {rank: 1}\n  - {rank: 8, placement: split}\n", r"run 'rank=8,placement=split'.*one process"),
        ("runs:\n  - {rank: 1}\n  - {rank: 8, max_staleness: 1}\n", r"run 'rank=8,max_staleness=1'.* has max_staleness=1: rl-multi .*synchronous"),
        ("runs:\n  - {rank: 1}\n  - {rank: 1}\n", r"same overrides"),
        ("runs:\n  - {rank: 1}\n  - {rnak: 8}\n", r"unknown config key 'rnak'"),
        ("runs:\n  - {rank: 1}\n  - {rank: 8, loss: nope}\n", r"'loss' must be one of"),
        ("runs:\n  - {rank: [1, 8]}\n", r"run 0 .*mapping of config key: value"),
        ("runs: []\n", r"'runs'.*non-empty list"),
        ("runs:\n  - {rank: 1}\ngrid: {lr: [1.0e-3]}\n", r"exactly one of 'runs'"),
        ("fixed: {max_steps: 3}\n", r"exactly one of 'runs'"),
        ("kind: rl\nruns:\n  - {rank: 1}\n", r"keys base, out, fixed, runs, grid; unknown: \['kind'\]"),
        ("- {rank: 1}\n", r"must be a mapping"),
    ],
)
def test_bad_multi_files_name_the_key_and_run(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_multi(_write(tmp_path, text))


def test_shared_keys_are_engine_and_base_keys():
    assert {"model", "dtype", "device", "max_tokens", "temperature", "group_size"} <= set(SHARED_KEYS)
    assert not {"rank", "lr", "seed", "alpha_rule", "prompts_per_step", "max_steps"} & set(SHARED_KEYS)


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    path = _write(tmp_path, "runs:\n  - {rank: full}\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["rl-multi", "--config", str(path)])
    assert exit_info.value.code == 2 and "rank=full" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--config FILE or --resume OUT"):
        cli_main(["rl-multi"])


# ----------------------------------------------------------------------------- learners

SPECS = [(1, "constant", 0), (4, "per_rank", 1)]  # (rank, alpha_rule, seed) of two runs


def _specs(path: str, dtype: str) -> list[LearnerSpec]:
    return [
        LearnerSpec(model_path=path, lora=lora.LoRASpec(rank=rank, alpha_rule=rule), lr=1e-2 / (k + 1), dtype=dtype, micro_batch=5, seed=seed)
        for k, (rank, rule, seed) in enumerate(SPECS)
    ]


def _step(learner: Learner, seed: int) -> dict[str, float]:
    batch = _batch(seed)
    return learner.train_step(batch, LossSpec(loss="tis", cap=2.0, temperature=0.8), norm=float(batch.num_tokens))


def _trainable(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_run_takes_exactly_the_update_it_would_take_alone(tiny_model_path, dtype):  # noqa: F811
    specs = _specs(tiny_model_path, dtype)
    shared = shared_base_learners(specs)
    alone = [Learner(spec) for spec in specs]
    for step in range(2):  # interleaved, as rl-multi does: run 0, run 1, run 0, run 1
        for k, (s, a) in enumerate(zip(shared, alone)):
            assert _step(s, seed=10 * step + k) == _step(a, seed=10 * step + k)
    for s, a in zip(shared, alone):
        mine, theirs = _trainable(s), _trainable(a)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[n], theirs[n]) for n in mine)
        assert s.sequence_logprobs([5, 9, 17, 33, 2]) == a.sequence_logprobs([5, 9, 17, 33, 2])


def test_runs_are_independent_and_share_one_base(tiny_model_path):  # noqa: F811
    learners = shared_base_learners(_specs(tiny_model_path, "bfloat16"))
    frozen = {n: p.detach().clone() for n, p in learners[0].model.named_parameters() if not p.requires_grad}
    before = _trainable(learners[1])
    _step(learners[0], seed=0)
    after = _trainable(learners[1])
    assert all(torch.equal(before[n], after[n]) for n in before), "training run 0 moved run 1's adapter"
    assert any(not torch.equal(p, 0 * p) for n, p in _trainable(learners[0]).items() if "lora_B" in n)
    for n, p in learners[1].model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]) and p.data_ptr() == dict(learners[0].model.named_parameters())[n].data_ptr(), n
    # memory: one base plus K adapters, counted by distinct storage
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in learners for p in m.model.parameters()}
    base = sum(p.untyped_storage().nbytes() for p in learners[0].model.parameters() if not p.requires_grad)
    adapters = sum(p.numel() * p.element_size() for m in learners for p in m.trainable)
    assert sum(storages.values()) == base + adapters


# ----------------------------------------------------------------------------- engine (slow)

TINY = {"prompts_per_step": 2, "group_size": 4, "max_tokens": 16, "kv_cache_gib": 1, "micro_batch": 8, "checkpoint_every": 1}
ROW_KEYS = {
    "step",
    "reward_mean",
    "cut_at_max_tokens",
    "signal_groups",
    "loss",
    "grad_norm",
    "entropy",
    "ratio_mean",
    "ratio_max",
    "truncated_frac",
    "kl_sample_train",
    "tokens",
    "train_tokens",
    "sample_s",
    "grade_s",
    "learn_s",
    "handoff_s",
    "handoff_bytes",
    "probe_gap",
    "probe_shift",
    "probe_tol",
    "probe_s",
    "fingerprint_s",
    "fingerprint_engine_s",
    "fingerprint_tensors",
    "fingerprint_ok",
    "fingerprint_fraction",
    "masked_frac",
    "clipped_frac",
    "staleness_mean",
    "staleness_max",
    "verify_s",
    "step_s",
}
PER_STALENESS = re.compile(r"(ratio_mean|kl_sample_train)_s\d+")  # present on steps that trained on a batch of that staleness


def _learner_logprobs(learner: Learner, prompt_ids: tuple[int, ...], completion_ids: tuple[int, ...], temperature: float) -> torch.Tensor:
    """(T,) the learner's logprobs of a completion's tokens (teacher forcing), logits / temperature."""
    ids = list(prompt_ids) + list(completion_ids)
    tokens_1_T = torch.tensor([ids])
    mask_1_T = torch.zeros(1, len(ids))
    mask_1_T[0, len(prompt_ids) - 1 : len(ids) - 1] = 1
    with torch.no_grad():
        lp_N, _ = learner.token_logprobs(tokens_1_T, torch.roll(tokens_1_T, -1, dims=1), mask_1_T, torch.tensor([len(ids)]), temperature)
    return lp_N


@pytest.mark.slow
def test_two_adapters_and_the_base_mixed_in_one_batch_each_get_their_own_logprobs():
    """float32 engine and learners: a rank-1 and a rank-8 adapter and the base model, interleaved in
    ONE generate call; every sampled token's logprob must be its own policy's (learner, teacher forced)."""
    from rlora.data import load_task, make_prompt
    from rlora.engine.sampler import EngineSpec, Sampler
    from rlora.rl.handoff import make_probe, publish
    from rlora.rl.steps import reward_group
    from rlora.train.models import resolve_model

    model_path = resolve_model("default")
    specs = [LearnerSpec(model_path=model_path, lora=lora.LoRASpec(rank=rank), lr=1e-3, dtype="float32", seed=k) for k, rank in enumerate((1, 8, 1))]
    learners = shared_base_learners(specs)  # the third keeps B = 0: exactly the base model
    for k, learner in enumerate(learners[:2]):
        with torch.no_grad():
            for b in lora.lora_parameters(learner.model)[1]:
                b.normal_(0, 0.03 * (k + 1), generator=torch.Generator().manual_seed(k))
    sampler = Sampler(EngineSpec(model_path=model_path, device="cpu", dtype="float32", lora_rank=8, max_num_seqs=16, max_loras=2))
    try:
        for name, learner in zip(("a", "b"), learners):
            stats = publish(learner, sampler.slot(name), 0, make_probe(sampler.tokenizer, "float32"))
            assert stats["probe_gap"] < 2e-3
        assert len(sampler.llm.llm_engine.list_loras()) == 2
        problems = load_task("arith", "", 9, 0)[:6]
        prompts = [make_prompt(p, sampler.tokenizer) for p in problems]
        tenants = ["a", None, "b", "b", None, "a"]
        samples = sampler.sample(prompts, 2, 12, 0.7, tenants)
        policy = {"a": learners[0], "b": learners[1], None: learners[2]}
        for prompt, tenant, group in zip(prompts, tenants, samples):
            for sample in group:
                want = _learner_logprobs(policy[tenant], prompt.prompt_ids, sample.completion_ids, 0.7)
                torch.testing.assert_close(torch.tensor(sample.sampler_logprobs), want, atol=2e-3, rtol=0, msg=f"tenant {tenant}")
                if tenant is not None:  # the adapters matter, so the check above has teeth
                    base = _learner_logprobs(learners[2], prompt.prompt_ids, sample.completion_ids, 0.7)
                    assert (base - want).abs().max() > 0.02
        assert reward_group(prompts[0], samples[0], sampler.slot("a").version).policy_version == 0
    finally:
        sampler.close()
        gc.collect()


class GenerateLog:
    """Records every sampling call (not the probes) the engine gets: prompts, adapters, adapters held."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from vllm import LLM

        self.calls: list[dict[str, object]] = []
        original = LLM.generate

        def generate(llm: LLM, prompts: list[object], params: object, **kwargs: object) -> object:
            if getattr(params, "prompt_logprobs", None) is None:
                loras = kwargs.get("lora_request")
                names = sorted({r.lora_name for r in loras if r is not None}) if isinstance(loras, list) else [getattr(loras, "lora_name", None)]
                self.calls.append({"prompts": len(prompts), "adapters": names, "held": len(llm.llm_engine.list_loras())})
            return original(llm, prompts, params, **kwargs)

        monkeypatch.setattr(LLM, "generate", generate)


def _steps(run_dir: Path) -> list[int]:
    return [int(r["step"]) for r in RunDir(run_dir).read_metrics()]  # type: ignore[call-overload]


@pytest.mark.slow
def test_two_runs_on_one_engine_end_to_end_then_resume_in_lockstep(tmp_path, monkeypatch):
    fixed = "\n".join(f"  {k}: {v}" for k, v in {**TINY, "max_steps": 2}.items())
    path = _write(tmp_path, f"out: {tmp_path / 'out'}\nfixed:\n{fixed}\nruns:\n  - {{rank: 1, lr: 1.0e-3}}\n  - {{rank: 8, lr: 3.0e-4, seed: 1}}\n")
    log = GenerateLog(monkeypatch)
    runs = run_multi(path, progress=False)
    assert [r.path.name for r in runs] == ["rank=1,lr=0.001", "rank=8,lr=0.0003,seed=1"]
    # one sampling call per step, both runs' prompts in it, each served by its own live adapter
    assert log.calls == [{"prompts": 4, "adapters": [f"run0-v{s}", f"run1-v{s}"], "held": 2} for s in (0, 1)]
    for run in runs:
        rows = run.read_metrics()
        assert [r["step"] for r in rows] == [0, 1]
        for r in rows:
            assert ROW_KEYS <= set(r) and all(PER_STALENESS.fullmatch(k) for k in set(r) - ROW_KEYS), set(r) ^ ROW_KEYS
        assert all(r["probe_gap"] < 0.5 and r["tokens"] > 0 for r in rows)
        assert (run.checkpoint_at(2) / "adapter" / "adapter_config.json").exists() and (run.path / "done.json").exists()
    saved = [json.loads((r.path / "config.json").read_text()) for r in runs]
    assert [(c["rank"], c["lr"], c["seed"]) for c in saved] == [(1, 1e-3, 0), (8, 3e-4, 1)]
    adapter_r8 = json.loads((runs[1].checkpoint_at(2) / "adapter" / "adapter_config.json").read_text())
    assert adapter_r8["r"] == 8

    # A kill between the two runs' step-2 checkpoints: run 1 is back at step 1 (its optimizer state
    # restored by hand, as the kill would have left it). Raising max_steps to 3 must replay step 1
    # for run 1 alone, then take step 2 with both.
    behind = runs[1]
    (behind.checkpoint_at(1) / "optimizer.pt").write_bytes((behind.checkpoint_at(2) / "optimizer.pt").read_bytes())
    (behind.checkpoint_at(1) / "rng.pt").write_bytes((behind.checkpoint_at(2) / "rng.pt").read_bytes())
    (behind.ckpt_root / "latest").write_text("step_000001")
    log.calls.clear()
    resume_multi(tmp_path / "out", {"max_steps": 3}, progress=False)
    assert [c["adapters"] for c in log.calls] == [["run1-v1"], ["run0-v2", "run1-v2"]]
    assert [c["prompts"] for c in log.calls] == [2, 4] and all(c["held"] == 2 for c in log.calls)
    assert _steps(runs[0].path) == [0, 1, 2] and _steps(behind.path) == [0, 1, 2]
    assert all(json.loads((r.path / "config.json").read_text())["max_steps"] == 3 for r in runs)
    # the file again, unchanged since: every run is already at its max_steps (3 in its config.json)
    with pytest.raises(ConfigError, match="max_steps"):
        run_multi(path, progress=False)
    from rlora.experiments.analyze import analyze

    assert analyze(tmp_path / "out").runs == 2  # a multi-run directory reads like a sweep
