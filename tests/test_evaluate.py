"""Evaluation: pass@k against enumeration, avg@K and its error by hand, a fake-sampler pipeline,
errors before any engine starts, compare; and (slow) real evaluations on the CPU engine."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from rlora.cli import main
from rlora.data import DataError, Problem
from rlora.engine.sampler import EngineSpec
from rlora.eval.evaluate import (
    EvalRequest,
    avg_at_k,
    evaluate_problems,
    load_benchmarks,
    pass_at_k,
    pass_ks,
    recompute,
    resolve_policy,
    run_eval,
)
from rlora.experiments.compare import compare
from rlora.rl.types import Prompt, Sample

DATA = Path(__file__).resolve().parent / "data"  # a few dozen rows of each benchmark, committed (tests/data/README.md)

# ------------------------------------------------------------------------------------ metrics


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 10))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_and_edges():
    assert pass_at_k(200, 0, 100) == 0.0
    assert pass_at_k(200, 200, 1) == 1.0
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)
    assert pass_at_k(200, 10, 50) == pytest.approx(1 - math.comb(190, 50) / math.comb(200, 50), rel=1e-9)
    with pytest.raises(AssertionError):
        pass_at_k(4, 1, 5)


def test_pass_ks():
    assert pass_ks(1) == [1]
    assert pass_ks(4) == [1, 2, 4]
    assert pass_ks(6) == [1, 2, 4, 6]
    assert pass_ks(16) == [1, 2, 4, 8, 16]


def test_avg_at_k_and_standard_error():
    scores = [[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]]  # per-problem means .75, 0, 1, .25
    avg, se = avg_at_k(scores)
    assert avg == pytest.approx(0.5)
    means = np.array([0.75, 0.0, 1.0, 0.25])
    assert se == pytest.approx(math.sqrt(((means - 0.5) ** 2).sum() / 3) / 2)
    assert avg_at_k([[1.0, 1.0]]) == (1.0, None)  # one problem: no error bar
    assert avg_at_k([[1.0], [1.0], [1.0]]) == (1.0, 0.0)


# ------------------------------------------------------------------------------------ the pipeline with a fake sampler


class ByteTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode(self, text, add_special_tokens=False):
        return list(text.encode())


class FakeSampler:
    """Even samples box the gold answer, odd ones box nothing; records each call's size."""

    def __init__(self, max_num_seqs: int = 4) -> None:
        self.tokenizer = ByteTokenizer()
        self.spec = EngineSpec(model_path="fake", max_model_len=4096, max_num_seqs=max_num_seqs)
        self.calls: list[int] = []

    def sample(self, prompts: list[Prompt], group_size: int, max_tokens: int, temperature: float) -> list[list[Sample]]:
        self.calls.append(len(prompts))
        out = []
        for p in prompts:
            texts = [f"so it is \\boxed{{{p.reference}}}" if i % 2 == 0 else "I am not sure." for i in range(group_size)]
            out.append(
                [
                    Sample(completion_ids=(1,) * (3 + i), sampler_logprobs=(0.0,) * (3 + i), text=t, finish_reason="stop" if i < 3 else "length")
                    for i, t in enumerate(texts)
                ]
            )
        return out


PROBLEMS = {
    "math500": [
        Problem("m1", "What is 1/2 + 1/2? Box it.", "1", "math", (("subject", "Algebra"), ("level", "1"))),
        Problem("m2", "Simplify 2x + 3x.", "5x", "math", (("subject", "Algebra"), ("level", "2"))),
        Problem("m3", "What is 7 * 6?", "42", "math", (("subject", "Prealgebra"), ("level", "1"))),
    ],
    "gsm8k": [Problem("g1", "Tom has 3 apples and gets 4 more. How many?", "7", "gsm8k"), Problem("g2", "2 + 2?", "4", "gsm8k")],
}


def test_pipeline_metrics_files_and_recompute(tmp_path):
    sampler = FakeSampler(max_num_seqs=4)
    results = evaluate_problems(sampler, PROBLEMS, 4, 1.0, 16, tmp_path, {"note": "fake"}, progress=False)
    assert sampler.calls == [1, 1, 1, 1, 1]  # 4 sequences per engine call = 1 problem of 4 samples
    m = results["benchmarks"]["math500"]
    assert m["problems"] == 3 and m["samples"] == 4
    assert m["avg@4"] == 0.5 and m["avg@4_se"] == 0.0
    assert m["pass@1"] == 0.5 and m["pass@2"] == pytest.approx(1 - 1 / 6) and m["pass@4"] == 1.0
    assert m["answered"] == 0.5 and m["truncated"] == 0.25 and m["mean_tokens"] == 4.5
    assert set(m["by_subject"]) == {"Algebra", "Prealgebra"} and m["by_subject"]["Algebra"]["problems"] == 2
    assert set(m["by_level"]) == {"1", "2"}
    assert "by_subject" not in results["benchmarks"]["gsm8k"]
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 5 and rows[0]["score"] == 1.0 and rows[1]["score"] == 0.0 and rows[1]["answer"] is None
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["benchmarks"] == results["benchmarks"] == recompute(tmp_path / "completions.jsonl")
    assert recompute(tmp_path / "completions.jsonl", regrade=True) == results["benchmarks"]
    table = (tmp_path / "results.md").read_text()
    assert "| math500 | 3 | 0.500 ± 0.000 |" in table and "math500 by subject" in table and "- note: fake" in table


def test_prompt_too_long_is_an_error_before_sampling():
    sampler = FakeSampler()
    sampler.spec = EngineSpec(model_path="fake", max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len 64"):
        evaluate_problems(sampler, PROBLEMS, 1, 1.0, 32, None, progress=False)
    assert sampler.calls == []


# ------------------------------------------------------------------------------------ errors before any engine


@pytest.fixture
def no_engine(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an engine was started")

    monkeypatch.setattr("rlora.eval.evaluate.Sampler", refuse)


def fake_run(root: Path, rank: object = 1) -> Path:
    run = root / "run"
    ckpt = run / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": "default", "rank": rank, "dtype": "float32", "lr": 1e-3}))
    (ckpt / "trainable.pt").write_bytes(b"")
    (ckpt / "state.json").write_text('{"next_step": 2}')
    (run / "checkpoints" / "latest").write_text(ckpt.name)
    if rank != "full":
        (ckpt / "adapter").mkdir()
        (ckpt / "adapter" / "adapter_config.json").write_text('{"r": 1, "lora_alpha": 32}')
        (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    return run


def test_policy_resolution(tmp_path):
    run = fake_run(tmp_path)
    lora = resolve_policy(None, None, None, str(run), 2, None)
    assert lora.adapter == run / "checkpoints" / "step_000002" / "adapter" and lora.adapter_rank == 1 and lora.dtype == "float32"
    assert resolve_policy(None, None, None, str(run), None, None) == lora  # latest checkpoint
    assert resolve_policy("other", None, str(run / "checkpoints" / "step_000002"), None, None, "bfloat16").model == "other"
    full = resolve_policy(None, None, None, str(fake_run(tmp_path / "f", "full")), 2, None)
    assert full.adapter is None and full.weights is not None and full.weights.name == "trainable.pt"
    base = resolve_policy(None, None, None, None, None, None)
    assert base.model == "default" and base.adapter is None and base.weights is None


@pytest.mark.parametrize(
    "extra, error",
    [
        (["--benchmarks", "math500,math5000"], "unknown benchmark 'math5000'"),
        (["--data-dir", "/nonexistent"], "does not exist"),
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--adapter", "/nonexistent/adapter"], "has no adapter_config.json"),
        (["--run", "RUN", "--step", "3"], r"no checkpoint at step 3; it has steps \[2\]"),
        (["--run", "/nonexistent/run"], "not a run directory"),
        (["--step", "3"], "--step needs --run"),
        (["--adapter", "A", "--run", "RUN"], "at most one of"),
        (["--samples", "2", "--temperature", "0"], "greedy"),
    ],
)
def test_eval_errors_before_any_engine(extra, error, tmp_path, no_engine, capsys):
    run = fake_run(tmp_path)
    extra = [str(run) if a == "RUN" else a for a in extra]
    args = ["eval", "--benchmarks", "math500", "--data-dir", str(DATA), "--limit", "2", "--out", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "rlora eval: error:" in err
    import re

    assert re.search(error, err), err


def test_run_eval_checks_benchmarks_first(no_engine, tmp_path):
    req = EvalRequest(policy=resolve_policy("/nonexistent/model", None, None, None, None, None), benchmarks=("aime26",), out=tmp_path)
    with pytest.raises(DataError, match="aime26"):
        run_eval(req)


def test_gold_answers_the_grader_rejects_are_reported(tmp_path, capsys):
    rows = [{"problem": "1 + 2?", "answer": "3", "unique_id": "ok"}, {"problem": "?", "answer": "}{", "unique_id": "broken"}]
    (tmp_path / "math500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_benchmarks(["math500"], 0, str(tmp_path))["math500"]) == 2
    assert "math500: the grader rejects the gold answer itself on 1 problems, e.g. ['broken']" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ compare


def write_run(path: Path, rank: object, rewards_S: list[float], evals: dict[int, float]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"rank": rank, "lr": 1e-4 if rank == "full" else 1e-3}))
    rows = []
    for step, r in enumerate(rewards_S):
        row: dict[str, object] = {"step": step, "reward_mean": r}
        if step in evals:
            row.update({"eval/gsm8k/avg@1": evals[step], "eval/gsm8k/avg@1_se": 0.01})
        rows.append(row)
    final = len(rewards_S)
    if final in evals:
        rows.append({"step": final, "eval/gsm8k/avg@1": evals[final], "eval/gsm8k/avg@1_se": 0.02})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_compare_table_and_plots(tmp_path):
    r1 = write_run(tmp_path / "r1", 1, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], {0: 0.1, 3: 0.2, 6: 0.3})
    full = write_run(tmp_path / "full", "full", [0.1, 0.3, 0.5, 0.7], {0: 0.1, 4: 0.4})
    text = compare([r1, full], tmp_path / "out")
    assert "| | r1 | full |" in text
    assert "| rank | 1 | full |" in text
    assert "| reward, last 5 steps | 0.400 | 0.400 |" in text
    assert "| reward, best step | 0.600 | 0.700 |" in text
    assert "| last eval step | 6 | 4 |" in text
    assert "| eval/gsm8k/avg@1 | 0.300 ± 0.020 | 0.400 ± 0.020 |" in text
    for name in ("compare.md", "reward_mean.png", "eval_gsm8k_avg@1.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        compare([r1, tmp_path / "missing"], tmp_path / "out2")


# ------------------------------------------------------------------------------------ real engine (slow)


@pytest.mark.slow
def test_eval_end_to_end_default_model(tmp_path, capsys):
    out = tmp_path / "eval"
    main(
        [
            "eval",
            "--model",
            "default",
            "--benchmarks",
            "math500,gsm8k",
            "--samples",
            "2",
            "--limit",
            "3",
            "--max-tokens",
            "24",
            "--temperature",
            "1.0",
            "--data-dir",
            str(DATA),
            "--out",
            str(out),
            "--kv-cache-gib",
            "1",
        ]
    )
    assert "| math500 | 3 |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 2 and all(0 < r["num_tokens"] <= 24 and r["score"] in (0.0, 1.0) for r in rows)
    m = results["benchmarks"]["math500"]
    assert {"avg@2", "avg@2_se", "pass@1", "pass@2", "by_subject", "by_level"} <= set(m)
    assert m["pass@1"] == pytest.approx(m["avg@2"]) and 0.0 <= m["avg@2"] <= m["pass@2"] <= 1.0
    assert results["runtime"]["gsm8k"]["problems_per_min"] > 0 and results["settings"]["samples"] == 2
    # the saved completions alone give the same results, graded again or not
    assert recompute(out / "completions.jsonl") == results["benchmarks"]
    assert recompute(out / "completions.jsonl", regrade=True) == results["benchmarks"]


@pytest.mark.slow
@pytest.mark.parametrize("rank", ["1", "full"])
def test_rl_periodic_eval_and_checkpoint_eval(rank, tmp_path):
    """A one-step run evaluates policies v0 and v1; `rlora eval --run --step 1` sees the same v1."""
    from rlora.config import RLConfig, load_config
    from rlora.rl.loop import run_rl

    run_dir = tmp_path / "run"
    lr = "1e-3" if rank == "1" else "1e-5"
    cfg = load_config(
        RLConfig,
        None,
        [
            "prompts_per_step=2",
            "group_size=4",
            "max_tokens=12",
            "kv_cache_gib=1",
            "micro_batch=8",
            "dtype=float32",
            f"rank={rank}",
            f"lr={lr}",
            "max_steps=1",
            "checkpoint_every=1",
            f"run_dir={run_dir}",
            "eval_every=1",
            "eval_benchmarks=gsm8k,math500",
            "eval_limit=2",
            f"eval_data_dir={DATA}",
        ],
    )
    run = run_rl(cfg, progress=False)
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [0, 1]
    assert "reward_mean" in rows[0] and "reward_mean" not in rows[1]
    for row in rows:
        for key in ("eval/gsm8k/avg@1", "eval/gsm8k/avg@1_se", "eval/math500/avg@1", "eval/math500/truncated", "eval_s"):
            assert key in row, key
    live = (run_dir / "eval" / "step_000001" / "completions.jsonl").read_text().splitlines()
    assert len(live) == 4

    policy = resolve_policy(None, None, None, str(run_dir), 1, None)
    assert (policy.adapter is None) == (rank == "full")
    req = EvalRequest(
        policy=policy,
        benchmarks=("gsm8k", "math500"),
        samples=1,
        temperature=0.0,
        max_tokens=12,
        limit=2,
        data_dir=str(DATA),
        out=tmp_path / "eval",
        device="cpu",
        kv_cache_gib=1,
    )
    results = run_eval(req, progress=False)
    # greedy, float32: the checkpoint's policy completes the prompts exactly as the live one did
    offline = (tmp_path / "eval" / "completions.jsonl").read_text().splitlines()
    assert [json.loads(x)["completion"] for x in offline] == [json.loads(x)["completion"] for x in live]
    assert results["benchmarks"]["gsm8k"]["avg@1"] == rows[1]["eval/gsm8k/avg@1"]
    text = compare([run_dir], tmp_path / "cmp")
    assert "eval/math500/avg@1" in text and (tmp_path / "cmp" / "eval_gsm8k_avg@1.png").exists()
