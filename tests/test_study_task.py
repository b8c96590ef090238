"""The `arith_chain` task and its held-out benchmark: generation, split, config, and how a run's
difficulty reaches periodic and offline evaluation. No engine starts (the RL loop's end-to-end
use of a benchmark is covered by test_evaluate's slow run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rewards
from rlora.cli import main
from rlora.config import ConfigError, RLConfig, load_config
from rlora.data import (
    HELD_OUT_SIZE,
    HELD_OUT_STREAM,
    ArithChain,
    DataError,
    arith_chain_problem,
    arith_chain_problems,
    is_held_out,
    load_benchmark,
    load_task,
)
from rlora.eval.evaluate import EvalRequest, default_arith, load_benchmarks, resolve_policy

PRESETS = Path(__file__).resolve().parents[1] / "configs"
CHAINS = [ArithChain(9, 4), ArithChain(20, 4), ArithChain(99, 2), ArithChain(99, 3), ArithChain(999, 5)]


def evaluate_chain(question: str) -> int:
    """The value of `What is a + b - c ...?`, read back from the question text (left to right)."""
    tokens = question.removeprefix("What is ").split("?")[0].split()
    total = int(tokens[0])
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        total = total + int(operand) if op == "+" else total - int(operand)
    return total


@pytest.mark.parametrize("chain", CHAINS)
def test_problems_are_a_pure_function_of_stream_index_and_difficulty(chain):
    first = arith_chain_problems(300, chain, 0, held_out=False)
    assert first == arith_chain_problems(300, chain, 0, held_out=False)
    assert first[:100] == arith_chain_problems(100, chain, 0, held_out=False)  # a prefix does not depend on n
    assert arith_chain_problem(7, 0, chain) == arith_chain_problem(7, 0, chain)
    assert first != arith_chain_problems(300, chain, 1, held_out=False)  # another seed, other problems
    assert load_task("arith_chain", "", chain.max_operand, 0, chain.terms)[:300] == first


@pytest.mark.parametrize("chain", CHAINS)
def test_answers_are_right_non_negative_and_graded_correct(chain):
    problems = arith_chain_problems(300, chain, 3, held_out=False) + arith_chain_problems(100, chain, HELD_OUT_STREAM, held_out=True)
    for p in problems:
        operands = [int(t) for t in p.question.removeprefix("What is ").split("?")[0].split()[::2]]
        assert len(operands) == chain.terms and all(1 <= x <= chain.max_operand for x in operands), p.question
        assert int(p.reference) == evaluate_chain(p.question) >= 0, p.question
        assert p.reward_task == "number" and p.question.endswith("Reply with just the number.")
        assert rewards.grade(p.reference, p.reference, "number") == 1.0
        assert rewards.grade(f"{p.question.split('?')[0][8:]} = {p.reference}", p.reference, "number") == 1.0
        assert rewards.grade(str(int(p.reference) + 1), p.reference, "number") == 0.0
    ops = [t for p in problems for t in p.question.split() if t in "+-"]
    assert 0.4 < ops.count("-") / len(ops) < 0.6, "subtraction as often as addition"


@pytest.mark.parametrize("chain", CHAINS)
def test_train_and_held_out_never_share_a_question(chain):
    test = arith_chain_problems(HELD_OUT_SIZE, chain, HELD_OUT_STREAM, held_out=True)  # CHAINS have enough
    assert len({p.question for p in test}) == len(test) == HELD_OUT_SIZE  # no question twice
    assert all(is_held_out(p.question) for p in test)
    test_questions = {p.question for p in test}
    for seed in (0, 1):
        train = arith_chain_problems(2000, chain, seed, held_out=False)
        assert not any(is_held_out(p.question) for p in train)
        assert not test_questions & {p.question for p in train}
    # the held-out set is one fixed stream: the same for every run seed and arm
    assert test == load_benchmark("arith_chain", arith=chain)


def test_a_small_problem_space_gives_every_held_out_question():
    """9x3 has about 200 distinct held-out questions: without a limit, all of them; a larger limit is an error."""
    chain = ArithChain(9, 3)
    test = load_benchmark("arith_chain", arith=chain)
    assert 50 <= len(test) <= HELD_OUT_SIZE and len({p.question for p in test}) == len(test)
    with pytest.raises(DataError, match="too few distinct held-out questions"):
        load_benchmark("arith_chain", limit=1000, arith=chain)


def test_split_is_about_one_in_ten():
    questions = [arith_chain_problem(i, 0, ArithChain(99, 3)).question for i in range(5000)]
    assert 0.08 < sum(map(is_held_out, questions)) / len(questions) < 0.12


def test_too_small_a_problem_space_names_the_keys():
    with pytest.raises(DataError, match=r"arith_max=9, arith_terms=2 has too few distinct held-out questions.*'arith_max' or 'arith_terms'"):
        load_benchmark("arith_chain", arith=ArithChain(9, 2))


@pytest.mark.parametrize(
    "override, key",
    [("arith_terms=1", "arith_terms"), ("arith_terms=0", "arith_terms"), ("arith_max=0", "arith_max"), ("arith_terms=three", "arith_terms")],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(RLConfig, None, ["task=arith_chain", override])
    with pytest.raises(ConfigError, match="config key 'task'"):
        load_config(RLConfig, None, ["task=arith_chains"])


def test_difficulty_errors_name_the_key():
    with pytest.raises(ConfigError, match="config key 'arith_terms'"):
        ArithChain(99, 1)
    with pytest.raises(ConfigError, match="config key 'arith_max'"):
        ArithChain(0, 3)


def test_defaults_agree():
    """load_task's and default_arith's defaults are RLConfig's."""
    cfg = RLConfig()
    assert default_arith() == ArithChain(cfg.arith_max, cfg.arith_terms)
    assert load_task("arith_chain", "", cfg.arith_max, 0)[:50] == load_task("arith_chain", "", cfg.arith_max, 0, cfg.arith_terms)[:50]


def test_benchmark_loads_with_the_given_difficulty_and_limit():
    chain = ArithChain(50, 4)
    problems = load_benchmarks(["arith_chain"], 30, "", chain)["arith_chain"]
    assert len(problems) == 30 and all(len(p.question.split("?")[0].split()) == 2 + 2 * chain.terms - 1 for p in problems)
    assert problems == load_benchmark("arith_chain", "", 30, chain)
    assert len(load_benchmarks(["arith_chain"], 0, "", chain)["arith_chain"]) == HELD_OUT_SIZE
    # without a difficulty: RLConfig's defaults
    assert load_benchmarks(["arith_chain"], 5)["arith_chain"] == load_benchmark("arith_chain", "", 5, default_arith())
    with pytest.raises(DataError, match="none were given"):
        load_benchmark("arith_chain")
    with pytest.raises(DataError, match=r"unknown benchmark 'arith_chian'; known: .*arith_chain"):
        load_benchmarks(["arith_chian"])


def test_periodic_eval_gets_the_runs_difficulty(monkeypatch, tmp_path):
    """`rlora rl`: the training problems and the eval sets are built from the run's arith_max and arith_terms."""
    import rlora.rl.loop as loop

    seen: dict[str, object] = {}

    class Stop(Exception):
        pass

    def fake_load_benchmarks(names, limit, data_dir, arith=None):
        seen["benchmarks"] = (list(names), limit, arith)
        raise Stop

    monkeypatch.setattr(loop, "load_benchmarks", fake_load_benchmarks)
    monkeypatch.setattr(loop, "load_task", lambda *args: seen.setdefault("task", args))
    cfg = load_config(RLConfig, PRESETS / "rl_cpu_study_full.yaml", [f"run_dir={tmp_path / 'run'}", "dtype=float32", "device=cpu"])
    with pytest.raises(Stop):
        loop.train(cfg, None, progress=False)  # type: ignore[arg-type]  # stops before the run dir is used
    assert seen["task"] == ("arith_chain", "", cfg.arith_max, cfg.seed, cfg.arith_terms)
    assert seen["benchmarks"] == (["arith_chain"], cfg.eval_limit, ArithChain(cfg.arith_max, cfg.arith_terms))


def fake_run(root: Path, config: dict[str, object]) -> Path:
    run = root / "run"
    ckpt = run / "checkpoints" / "step_000002"
    (ckpt / "adapter").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": "default", "rank": 1, "dtype": "float32", **config}))
    (ckpt / "trainable.pt").write_bytes(b"")
    (ckpt / "state.json").write_text('{"next_step": 2}')
    (run / "checkpoints" / "latest").write_text(ckpt.name)
    (ckpt / "adapter" / "adapter_config.json").write_text('{"r": 1, "lora_alpha": 32}')
    (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    return run


@pytest.mark.parametrize(
    "config, flags, expected",
    [
        ({"task": "arith_chain", "arith_max": 50, "arith_terms": 4}, [], ArithChain(50, 4)),  # the run's own
        ({"task": "arith_chain", "arith_max": 50, "arith_terms": 4}, ["--arith-terms", "2"], ArithChain(50, 2)),  # a flag overrides one key
        ({"task": "arith", "arith_max": 9}, [], ArithChain(9, RLConfig.arith_terms)),  # an older run without arith_terms
        (None, ["--arith-max", "20"], ArithChain(20, RLConfig.arith_terms)),  # no run: RLConfig's defaults
    ],
)
def test_rlora_eval_uses_the_runs_difficulty(config, flags, expected, monkeypatch, tmp_path):
    captured: list[EvalRequest] = []

    class Stop(Exception):
        pass

    def fake_run_eval(req: EvalRequest, progress: bool = True) -> dict[str, object]:
        captured.append(req)
        raise Stop

    monkeypatch.setattr("rlora.eval.evaluate.run_eval", fake_run_eval)
    target = ["--run", str(fake_run(tmp_path, config))] if config is not None else []
    with pytest.raises(Stop):
        main(["eval", "--benchmarks", "arith_chain", "--out", str(tmp_path / "out"), *target, *flags])
    assert captured[0].arith == expected
    if config is not None:
        assert resolve_policy(None, None, None, target[1], None, None).arith == ArithChain(config["arith_max"], config.get("arith_terms", 3))


@pytest.mark.parametrize("preset", ["rl_cpu_study_full.yaml", "rl_cpu_study_lora_r1.yaml"])
def test_study_presets_load_and_train_on_the_calibrated_task(preset):
    cfg = load_config(RLConfig, PRESETS / preset)
    full = load_config(RLConfig, PRESETS / "rl_cpu_study_full.yaml")
    assert cfg.task == "arith_chain" and cfg.eval_benchmarks == "arith_chain" and cfg.eval_every > 0
    assert (cfg.arith_max, cfg.arith_terms, cfg.max_tokens, cfg.group_size) == (full.arith_max, full.arith_terms, full.max_tokens, full.group_size)
    if cfg.is_full:
        assert cfg.dtype == "auto"
    else:
        assert cfg.rank == 1 and cfg.lr == pytest.approx(10 * full.lr)
    load_benchmarks(["arith_chain"], cfg.eval_limit, "", ArithChain(cfg.arith_max, cfg.arith_terms))


@pytest.mark.parametrize("preset", ["rl_cpu_long_full.yaml", "rl_cpu_long_lora_r1.yaml"])
def test_long_curve_presets_share_the_50x2_task_and_keep_the_10x_ratio(preset):
    cfg = load_config(RLConfig, PRESETS / preset)
    full = load_config(RLConfig, PRESETS / "rl_cpu_long_full.yaml")
    # 50 x 2, not the study's 20 x 2: 2,500 operand pairs are not covered within 100 steps
    assert (cfg.task, cfg.arith_max, cfg.arith_terms) == ("arith_chain", 50, 2)
    assert cfg.max_steps >= 100 and cfg.eval_every > 0 and cfg.eval_benchmarks == "arith_chain"
    assert (cfg.prompts_per_step, cfg.group_size, cfg.max_tokens, cfg.max_steps) == (
        full.prompts_per_step,
        full.group_size,
        full.max_tokens,
        full.max_steps,
    )
    if cfg.is_full:
        assert cfg.lr == pytest.approx(3e-6)  # the lr whose curve still rises after step 50 (docs)
    else:
        assert cfg.rank == 1 and cfg.alpha_rule == "constant" and cfg.lr == pytest.approx(10 * full.lr)
    # the docs' checkpoint evaluation: 200 held-out questions at the run's own difficulty
    problems = load_benchmarks(["arith_chain"], 200, "", ArithChain(cfg.arith_max, cfg.arith_terms))["arith_chain"]
    assert len({p.question for p in problems}) == 200


def test_long_curve_claims_match_the_committed_checkpoint_evaluations():
    """docs/study_rl_cpu.md's "still rising after step 50" is recomputed from the per-question scores."""
    docs = PRESETS.parent / "docs"
    evals = json.loads((docs / "study_rl_cpu" / "checkpoint_evals_50x2.json").read_text())["arms"]
    text = " ".join((docs / "study_rl_cpu.md").read_text().split())  # line breaks as spaces

    def paired(arm_b: str, step_b: int, arm_a: str, step_a: int) -> tuple[str, float, float]:
        """The difference b - a as the doc writes it, and its 95% interval's ends."""
        a = next(r for r in evals[arm_a] if r["step"] == step_a)["per_question"]
        b = next(r for r in evals[arm_b] if r["step"] == step_b)["per_question"]
        assert sorted(a) == sorted(b) and len(a) == 200  # the same held-out questions at every checkpoint
        diff_Q = [b[q] - a[q] for q in a]
        mean = sum(diff_Q) / len(diff_Q)
        se = (sum((d - mean) ** 2 for d in diff_Q) / (len(diff_Q) - 1) / len(diff_Q)) ** 0.5
        lo, hi = mean - 1.97 * se, mean + 1.97 * se
        return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]", lo, hi

    base = evals["base"][0]
    assert 0.05 <= base["avg@4"] <= 0.30 and "Base reward 6.0% +- 0.9%" in text
    rise, rise_lo, _ = paired("fullft_lr3e-6", 100, "fullft_lr3e-6", 50)
    assert rise_lo > 0  # still rising after step 50
    assert f"step 100 - step 50 = **{rise}**" in text
    assert f"step 60 - step 50 = {paired('fullft_lr1e-5', 60, 'fullft_lr1e-5', 50)[0]}" in text  # lr 1e-5 is flat
    assert f"step 60 **{paired('lora_r1_lr3e-5', 60, 'fullft_lr3e-6', 60)[0]}**" in text  # rank 1 trails
    # The second seed: other prompts in another order, the same claims.
    rise_seed1, rise_seed1_lo, _ = paired("fullft_lr3e-6_seed1", 100, "fullft_lr3e-6_seed1", 50)
    assert rise_seed1_lo > 0
    assert f"step 100 - step 50 = **{rise_seed1}**" in text
    gap_seed1, _, gap_seed1_hi = paired("lora_r1_lr3e-5_seed1", 60, "fullft_lr3e-6_seed1", 60)
    assert gap_seed1_hi < 0  # rank 1 trails
    assert f"at step 60 **{gap_seed1}**" in text
