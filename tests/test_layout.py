"""Issue 10's contracts: dtype auto, choices checked at load, keyword-only specs, tracking, finish reasons, layout."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlora import devices
from rlora.config import CHOICES, ConfigError, RLConfig, load_config
from rlora.runs import RunDir

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ dtype auto


@pytest.mark.parametrize(
    "flags,expected",
    [(frozenset({"avx2", "avx512_bf16"}), "bfloat16"), (frozenset({"avx2", "amx_bf16"}), "bfloat16"), (frozenset({"avx2", "fma"}), "float32")],
)
def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it(monkeypatch, flags, expected):
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    dtype, why = devices.resolve_dtype("auto", "cpu")
    assert dtype == expected and why.startswith(f"dtype auto -> {expected}")
    assert devices.resolve_dtype("float32", "cpu")[0] == "float32"  # an explicit choice stays


def test_resolved_dtype_is_printed_once_and_saved(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(devices, "_said", set())
    cfg = RLConfig(device="cpu", run_dir=str(tmp_path / "run"))
    assert cfg.dtype == "auto"
    resolved = devices.resolve_precision(cfg)
    devices.resolve_precision(cfg)
    assert resolved.dtype == "float32" and dataclasses.replace(resolved, dtype="auto") == cfg
    err = capsys.readouterr().err
    assert err.count("dtype auto -> float32") == 1 and "no AVX512-BF16 or AMX" in err
    from rlora.runs import create_run

    run = create_run(resolved, "x", "rl")
    assert json.loads(run.config_path.read_text())["dtype"] == "float32"


def test_explicit_bf16_on_a_cpu_without_it_warns(monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(devices, "_said", set())
    with pytest.warns(UserWarning, match="tens of times slower"):
        cfg = devices.resolve_precision(RLConfig(device="cpu", dtype="bfloat16"))
    assert cfg.dtype == "bfloat16"


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "key,bad", [("dtype", "bf16"), ("loss", "ppo"), ("alpha_rule", "linear"), ("lora_init", "zeros"), ("advantage", "std"), ("task", "aime")]
)
def test_bad_choice_fails_at_load_naming_key_and_choices(tmp_path, key, bad):
    preset = tmp_path / "p.yaml"
    preset.write_text(f"{key}: {bad}\n")
    with pytest.raises(ConfigError, match=rf"config key '{key}' must be one of \[.*'{CHOICES[key][0]}'.*\], got '{bad}'"):
        load_config(RLConfig, preset)


def test_choices_are_the_registries_keys():
    from rlora.data import TRAIN_TASKS
    from rlora.rl.advantages import ADVANTAGES
    from rlora.rl.losses import LOSSES, NORMALIZERS
    from rlora.train import lora
    from rlora.train.distributed import LEARNERS
    from rlora.train.learner import DTYPES

    assert set(CHOICES["alpha_rule"]) == set(lora.ALPHA_RULES) and set(CHOICES["lora_init"]) == set(lora.INITS)
    assert set(CHOICES["advantage"]) == set(ADVANTAGES) and set(CHOICES["loss"]) == set(LOSSES)
    assert set(CHOICES["loss_norm"]) == set(NORMALIZERS) and set(CHOICES["learner_parallel"]) == set(LEARNERS)
    assert set(CHOICES["dtype"]) == {"auto", *DTYPES} and set(CHOICES["task"]) == set(TRAIN_TASKS)


def test_rl_and_sft_share_one_training_base():
    from rlora.config import TrainConfig
    from rlora.sft.loop import SFTConfig

    base = {f.name for f in dataclasses.fields(TrainConfig)}
    assert base <= {f.name for f in dataclasses.fields(RLConfig)} and base <= {f.name for f in dataclasses.fields(SFTConfig)}
    assert {"lr", "rank", "alpha_rule", "dtype", "report_to", "micro_batch"} <= base


def test_specs_are_keyword_only():
    from rlora.engine.sampler import EngineSpec
    from rlora.train.learner import LearnerSpec
    from rlora.train.lora import LoRASpec

    with pytest.raises(TypeError):
        LearnerSpec("model", None, 1e-3)  # type: ignore[misc]
    with pytest.raises(TypeError):
        LoRASpec(4, "constant")  # type: ignore[misc]
    with pytest.raises(TypeError):
        EngineSpec("model", "cpu", "float32")  # type: ignore[misc]
    assert LoRASpec(rank=4).rank == 4


# ------------------------------------------------------------------------------------ rollouts


def test_step_metrics_log_the_share_cut_at_max_tokens():
    from rlora.rl.steps import step_metrics
    from rlora.rl.types import Group, Prompt, Rollout

    prompt = Prompt(problem_id="p", question="q", prompt_ids=(1, 2), reference="1", reward_task="number")

    def rollout(reward: float, reason: str) -> Rollout:
        return Rollout(prompt_ids=(1, 2), completion_ids=(3,), sampler_logprobs=(-0.1,), reward=reward, text="", finish_reason=reason)

    groups = [
        Group(prompt=prompt, rollouts=(rollout(1, "stop"), rollout(0, "length")), policy_version=0),
        Group(prompt=prompt, rollouts=(rollout(0, "length"), rollout(0, "length")), policy_version=0),
    ]
    assert groups[0].cut_at_max_tokens == 1 and groups[1].cut_at_max_tokens == 2
    assert step_metrics(0, groups, {}, 0)["cut_at_max_tokens"] == 0.75


# ------------------------------------------------------------------------------------ tracking


def test_tensorboard_gets_every_numeric_row(tmp_path):
    run = RunDir(tmp_path / "run", report_to="tensorboard")
    run.path.mkdir()
    for step in range(3):
        run.log({"step": step, "reward_mean": 0.25 * step, "note": "text is skipped", "entropy": float("nan")})
    run.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["reward_mean"]
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert len(run.read_metrics()) == 3  # metrics.jsonl stays the source of truth


def test_wandb_offline_needs_no_network(tmp_path):
    # A child process: wandb starts a service process, and the env must not leak into other tests.
    code = f"""
import os, json
from pathlib import Path
for k in ("WANDB_MODE", "WANDB_API_KEY"):
    os.environ.pop(k, None)
from rlora.runs import RunDir
run = RunDir(Path({str(tmp_path / "run")!r}), report_to="wandb")
run.path.mkdir()
(run.path / "config.json").write_text(json.dumps({{"lr": 0.001}}))
for step in range(2):
    run.log({{"step": step, "reward_mean": 0.5 + step}})
run.close()
print("MODE", os.environ["WANDB_MODE"])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MODE offline" in out.stdout
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="report_to"):
        RLConfig(report_to="mlflow")


# ------------------------------------------------------------------------------------ layout


def test_no_import_cycles_and_only_the_engine_imports_vllm():
    imports: dict[str, set[str]] = {}
    for path in (REPO / "rlora").rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        imports[module] = names
    vllm_users = {m for m, names in imports.items() if any(n == "vllm" or n.startswith("vllm.") for n in names)}
    assert vllm_users and all(m.startswith("rlora.engine.") for m in vllm_users), vllm_users
    modules = set(imports)
    edges = {
        m: {n for n in names if n in modules and n != m}
        | {n.rpartition(".")[0] for n in names if n.rpartition(".")[0] in modules and n.rpartition(".")[0] not in (m, "rlora")}
        for m, names in imports.items()
    }
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in edges[m]:
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path + [n])}"
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])


def test_quiet_vllm_keeps_a_users_level(monkeypatch):
    from rlora.engine.sampler import quiet_vllm

    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    quiet_vllm()
    import os

    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    quiet_vllm()
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"


def test_signed_numbers_never_print_minus_zero():
    from rlora.experiments.analyze import signed

    assert signed(-0.001) == "+0.00" and signed(-0.0) == "+0.00" and signed(-0.5) == "-0.50" and signed(0.25) == "+0.25"


def test_harmless_vllm_warnings_are_dropped_and_others_kept():
    import logging

    from rlora.engine.sampler import HARMLESS_VLLM_WARNINGS, drop_harmless_vllm_warnings

    logger = logging.getLogger("vllm")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        drop_harmless_vllm_warnings()
        drop_harmless_vllm_warnings()  # idempotent
        child = logging.getLogger("vllm.v1.worker.cpu_worker")
        child.warning("CPU backend %s, skip it.", "doesn't allow to use `torch.set_num_threads` after the thread binding")
        child.warning("KV cache is full")
        assert records == ["KV cache is full"] and len(HARMLESS_VLLM_WARNINGS) == 2
        assert sum(1 for f in handler.filters) == 1
    finally:
        logger.removeHandler(handler)


def test_reward_policy_is_a_checked_choice_and_reaches_the_grader(tmp_path):
    import rewards
    from rlora.rl.steps import reward_group
    from rlora.rl.types import Prompt, Sample

    assert set(CHOICES["reward_policy"]) == set(rewards.POLICIES)
    with pytest.raises(ConfigError, match="reward_policy"):
        RLConfig(reward_policy="lenient")
    prompt = Prompt(problem_id="p", question="q", prompt_ids=(1,), reference="42", reward_task="math")
    unboxed = Sample(completion_ids=(2,), sampler_logprobs=(-0.1,), text="The final answer is 42.", finish_reason="stop")
    assert reward_group(prompt, [unboxed], 0, "default").rewards_G == [1.0]
    assert reward_group(prompt, [unboxed], 0, "strict").rewards_G == [0.0]  # strict: boxed answers only
    run = RunDir(tmp_path)
    run.record({"reward_policy": rewards.describe_policy("strict")})
    run.record({"dtype": "float32"})
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["dtype"] == "float32" and info["reward_policy"].startswith("rewards/strict/v")
