"""Sweep and analysis tests: grid expansion, run names, resume with a fake entry point, the
analysis on synthetic results with a known optimum and band, suggest-lr, and one tiny real
sweep end to end (slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlora.config import ConfigError, save_config
from rlora.experiments import sweep as sweep_mod
from rlora.experiments.analyze import METRICS, Curve, analyze, band, best_lr
from rlora.experiments.suggest import suggest_lr
from rlora.experiments.sweep import Kind, expand_grid, load_sweep, run_name, run_worker
from rlora.runs import RunDir
from rlora.sft.loop import SFTConfig

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- grid and names


def test_grid_is_a_product_in_key_order():
    points = expand_grid({"rank": [1, 4], "lr": [1e-3, 1e-2, 1e-1]})
    assert len(points) == 6
    assert points[0] == {"rank": 1, "lr": 1e-3} and points[-1] == {"rank": 4, "lr": 1e-1}


def test_grid_list_is_a_union():
    points = expand_grid([{"alpha_rule": ["constant"], "lr": [1, 2]}, {"alpha_rule": ["per_rank"], "lr": [3]}])
    assert points == [{"alpha_rule": "constant", "lr": 1}, {"alpha_rule": "constant", "lr": 2}, {"alpha_rule": "per_rank", "lr": 3}]


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"lr": []}, "non-empty list"),
        ({"lr": 1e-3}, "non-empty list"),
        ([], "empty"),
    ],
)
def test_bad_grids_fail(grid, message):
    with pytest.raises(ConfigError, match=message):
        expand_grid(grid)


def test_run_names_are_short_and_stable():
    assert run_name((("rank", 4), ("lr", 0.001), ("alpha_rule", "sqrt"))) == "rank=4,lr=0.001,alpha_rule=sqrt"
    assert run_name((("lr", 3e-05), ("rank", "full"))) == "lr=3e-05,rank=full"
    assert run_name((("train_data", "data/x.jsonl"),)) == "train_data=data_x.jsonl"


def test_sweep_file_fullft_collapses_and_yaml_floats_normalise(tmp_path):
    spec = _write(
        tmp_path / "s.yaml",
        """
kind: sft
fixed: {max_steps: 2}
grid:
  rank: [1, 4, full]
  lr: [1e-3, 1.0e-2]          # YAML reads 1e-3 as a string: still the float 0.001
  alpha_rule: [constant, sqrt]
""",
    )
    sweep = load_sweep(spec, out=tmp_path / "out")
    names = [p.name for p in sweep.points]
    assert len(names) == 2 * 2 * 2 + 2  # FullFT has no alpha rule: one run per lr
    assert "rank=1,lr=0.001,alpha_rule=sqrt" in names and "rank=full,lr=0.01" in names
    full = next(p for p in sweep.points if p.name == "rank=full,lr=0.01")
    assert full.config.max_steps == 2 and full.config.run_dir == str(tmp_path / "out" / "rank=full,lr=0.01")


@pytest.mark.parametrize(
    "text, message",
    [
        ("kind: sft\ngrid: {rnak: [1]}\n", "unknown config key 'rnak'"),
        ("kind: sft\ngrid: {rank: [0]}\n", "'rank'"),
        ("kind: dpo\ngrid: {rank: [1]}\n", "'kind'"),
        ("kind: sft\ngird: {rank: [1]}\n", "unknown sweep key 'gird'"),
        ("kind: sft\nfixed: {lr: fast}\ngrid: {rank: [1]}\n", "'lr'"),
    ],
)
def test_bad_sweep_files_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(_write(tmp_path / "bad.yaml", text))


def test_presets_expand():
    cpu = load_sweep(REPO / "configs" / "sweep_sft_cpu.yaml")
    ranks = {dict(p.overrides)["rank"] for p in cpu.points}
    rules = {dict(p.overrides).get("alpha_rule") for p in cpu.points if dict(p.overrides)["rank"] != "full"}
    assert ranks == {1, 4, 16, 64, "full"} and rules == {"constant", "per_rank", "sqrt"}
    assert all(p.config.model == "default" and p.config.lora_targets == "all-linear" for p in cpu.points)
    assert len(load_sweep(REPO / "configs" / "sweep_sft_tiny.yaml").points) == 4


# ----------------------------------------------------------------------------- running and resume (fake entry point)


class FakeTrainer:
    """Stands in for `rlora sft`: writes config and metrics; can be told to crash on a run."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.resumed: list[str] = []
        self.crash_on: set[str] = set()

    def _train(self, run_dir: Path) -> RunDir:
        run = RunDir(run_dir)
        cfg = json.loads(run.config_path.read_text())
        for step in range(len(run.read_metrics()), cfg["max_steps"] + 1):
            if run_dir.name in self.crash_on and step == 1:
                raise RuntimeError("out of memory")
            run.log({"step": step, "eval_loss": 1.0 / (1 + step * cfg["lr"])})
        return run

    def start(self, cfg: object, name: str, progress: bool) -> RunDir:
        self.started.append(name)
        save_config(cfg, Path(cfg.run_dir) / "config.json")  # type: ignore[attr-defined]
        return self._train(Path(cfg.run_dir))  # type: ignore[attr-defined]

    def resume(self, path: Path, progress: bool) -> RunDir:
        self.resumed.append(path.name)
        return self._train(path)


@pytest.fixture
def fake(monkeypatch):
    trainer = FakeTrainer()
    monkeypatch.setitem(sweep_mod.KINDS, "sft", Kind(lambda: SFTConfig, trainer.start, trainer.resume))
    return trainer


def _fake_sweep(tmp_path, grid="{rank: [1, full], lr: [0.1, 0.2]}"):
    spec = _write(tmp_path / "s.yaml", f"kind: sft\nfixed: {{max_steps: 3}}\ngrid: {grid}\n")
    return load_sweep(spec, out=tmp_path / "out")


def test_rerun_skips_done_resumes_partial_retries_failed(tmp_path, fake):
    sweep = _fake_sweep(tmp_path)
    fake.crash_on = {"rank=1,lr=0.2"}
    first = run_worker(sweep, log=lambda s: None)
    assert first["failed"] == ["rank=1,lr=0.2"] and len(first["done"]) == 3
    assert "out of memory" in (sweep.out / "rank=1,lr=0.2" / "error.txt").read_text()
    assert RunDir(sweep.out / "rank=1,lr=0.2").status() == "partial"

    fake.crash_on = set()
    second = run_worker(sweep, log=lambda s: None)
    assert second["done"] == ["rank=1,lr=0.2"] and len(second["skipped"]) == 3
    assert fake.resumed == ["rank=1,lr=0.2"] and fake.started.count("rank=1,lr=0.2") == 1
    assert not (sweep.out / "rank=1,lr=0.2" / "error.txt").exists()
    steps = [r["step"] for r in RunDir(sweep.out / "rank=1,lr=0.2").read_metrics()]
    assert steps == [0, 1, 2, 3]  # resumed where it stopped, no step twice
    assert run_worker(sweep, log=lambda s: None)["skipped"] == [p.name for p in sweep.points]


def test_run_held_by_another_worker_is_skipped(tmp_path, fake):
    sweep = _fake_sweep(tmp_path)
    held = sweep.out / "rank=1,lr=0.1"
    with RunDir(held).claim() as mine:
        assert mine
        out = run_worker(sweep, log=lambda s: None)
    assert "rank=1,lr=0.1" in out["skipped"] and RunDir(held).status() == "new"
    assert run_worker(sweep, log=lambda s: None)["done"] == ["rank=1,lr=0.1"]


def test_changed_sweep_file_is_refused_for_an_existing_run(tmp_path, fake):
    sweep = _fake_sweep(tmp_path)
    fake.crash_on = {"rank=1,lr=0.1"}
    run_worker(sweep, log=lambda s: None)
    changed = load_sweep(_write(tmp_path / "s.yaml", "kind: sft\nfixed: {max_steps: 5}\ngrid: {rank: [1, full], lr: [0.1, 0.2]}\n"), out=tmp_path / "out")
    with pytest.raises(ConfigError, match="max_steps=3 but the sweep now says max_steps=5"):
        run_worker(changed, log=lambda s: None)


def test_budget_leaves_runs_for_the_next_invocation(tmp_path, fake):
    sweep = _fake_sweep(tmp_path)
    out = run_worker(sweep, log=lambda s: None, budget_s=1e-9)
    assert len(out["done"]) == 1 and len(out["left"]) == 3


# ----------------------------------------------------------------------------- analysis on synthetic results

LRS = [float(10**e) for e in np.arange(-4.5, -0.74, 0.25)]
RANKS = [1, 4, 16, 64]
TRUE_BEST = {  # best lr of each rule at rank r: flat, 1/r, 1/sqrt(r) (and FullFT 10x below "constant")
    "constant": lambda r: 1e-3,
    "per_rank": lambda r: 2e-2 / r,
    "sqrt": lambda r: 6e-3 / math.sqrt(r),
    "full": lambda r: 1e-4,
}


def synthetic_loss(lr: float, best: float) -> float:
    """A U in log lr: 0.5 at the best lr, log(loss) rising by 0.2 per decade squared away from it."""
    return 0.5 * math.exp(0.2 * (math.log10(lr) - math.log10(best)) ** 2)


def _fake_run(root: Path, name: str, final: float | None, kind: str = "sft", **cfg_kw) -> None:
    path = root / name
    path.mkdir(parents=True)
    cfg = SFTConfig(max_steps=4, run_dir=str(path), **cfg_kw)
    save_config(cfg, path / "config.json")
    run = RunDir(path)
    run.log({"step": 0, "eval_loss": 0.9})
    if final is not None:
        run.log({"step": 4, "eval_loss": final})


@pytest.fixture
def synthetic_sweep(tmp_path):
    root = tmp_path / "sweep"
    for rule in ("constant", "per_rank", "sqrt"):
        for r in RANKS:
            for lr in LRS:
                _fake_run(root, f"r{r}-{rule}-{lr:g}", synthetic_loss(lr, TRUE_BEST[rule](r)), rank=r, lr=lr, alpha_rule=rule)
    for lr in LRS:
        _fake_run(root, f"full-{lr:g}", synthetic_loss(lr, TRUE_BEST["full"](0)), rank="full", lr=lr)
    _fake_run(root, "unfinished", None, rank=4, lr=1e-3)
    (root / "sweep.json").write_text(json.dumps({"kind": "sft"}))
    return root


def test_analysis_finds_the_known_optimum_exponent_ratio_and_band(synthetic_sweep):
    a = analyze(synthetic_sweep, tol=0.05)
    panels = {p.name: p for p in a.panels}
    assert set(panels) == {"alpha_rule=constant", "alpha_rule=per_rank", "alpha_rule=sqrt"}
    assert a.unfinished == ("unfinished",)
    for rule, panel in panels.items():
        rule = rule.split("=")[1]
        assert panel.full is not None and panel.full.best.lr == pytest.approx(1e-4, rel=1e-6)
        for r in panel.ranks:
            # the parabola (in log lr, fitted to log loss) is exact for this U: the optimum between grid points is recovered
            assert r.best.method == "parabola"
            assert r.best.lr == pytest.approx(TRUE_BEST[rule](r.rank), rel=1e-6)
            assert r.best.value == pytest.approx(0.5, abs=1e-9)
            assert r.ratio_to_full == pytest.approx(TRUE_BEST[rule](r.rank) / 1e-4, rel=1e-6)
            # band: loss <= best grid loss * 1.05 <=> |log10 lr - log10 best| <= sqrt(log(1.05 * best / 0.5) / 0.2)
            half_width = math.sqrt(math.log(1.05 * r.best.grid_value / 0.5) / 0.2)
            expected = tuple(lr for lr in LRS if abs(math.log10(lr) - math.log10(TRUE_BEST[rule](r.rank))) <= half_width)
            assert r.band.grid == expected
            assert math.log10(r.band.lo) == pytest.approx(math.log10(TRUE_BEST[rule](r.rank)) - half_width, abs=0.03)
            assert math.log10(r.band.hi) == pytest.approx(math.log10(TRUE_BEST[rule](r.rank)) + half_width, abs=0.03)
    assert panels["alpha_rule=constant"].rank_exponent == pytest.approx(0.0, abs=1e-6)
    assert panels["alpha_rule=per_rank"].rank_exponent == pytest.approx(-1.0, abs=1e-6)
    assert panels["alpha_rule=sqrt"].rank_exponent == pytest.approx(-0.5, abs=1e-6)
    # one lr fits every rank under constant alpha; under alpha = r the bands do not overlap
    assert panels["alpha_rule=constant"].shared_grid == panels["alpha_rule=constant"].ranks[0].band.grid
    assert panels["alpha_rule=per_rank"].shared_grid == () and panels["alpha_rule=per_rank"].shared_lo is None
    out = synthetic_sweep / "analysis"
    for name in ("heatmaps.png", "ucurves.png", "best_lr.png", "report.md", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "p = +0.00" in report and "p = -1.00" in report and "p = -0.50" in report
    assert json.loads((out / "summary.json").read_text())["panels"][0]["name"] == "alpha_rule=constant"


def test_edges_and_divergence_are_flagged_not_interpolated():
    metric = METRICS["sft"]
    lrs = (1e-4, 1e-3, 1e-2, 1e-1)
    low = best_lr(Curve(lrs, (0.5, 0.6, 0.7, 0.8), ("",) * 4), metric)
    assert low.edge == "low" and low.method == "grid" and low.lr == 1e-4
    high = best_lr(Curve(lrs, (0.8, 0.7, 0.6, 0.5), ("",) * 4), metric)
    assert high.edge == "high" and high.lr == 1e-1
    next_to_nan = Curve(lrs, (0.8, 0.6, 0.5, float("nan")), ("",) * 4)
    b = best_lr(next_to_nan, metric)
    assert b.method == "grid" and b.edge == "" and b.lr == 1e-2
    assert band(next_to_nan, b, metric, 0.25).hi == 1e-2  # a diverged neighbour ends the band
    assert best_lr(Curve(lrs, (float("nan"),) * 4, ("",) * 4), metric) is None


def test_rl_metric_maximises_reward():
    metric = METRICS["rl"]
    lrs = (1e-5, 1e-4, 1e-3, 1e-2)
    rewards = tuple(0.8 - 0.2 * (math.log10(lr) + 3.3) ** 2 for lr in lrs)  # best at 10^-3.3
    b = best_lr(Curve(lrs, rewards, ("",) * 4), metric)
    assert b.method == "parabola" and math.log10(b.lr) == pytest.approx(-3.3, abs=1e-9)
    rows = [{"step": s, "reward_mean": 0.1 if s < 8 else 0.6} for s in range(10)]
    assert metric.final(rows, {"max_steps": 10}) == pytest.approx(0.6)  # the last 20% of steps
    assert metric.final(rows[:5], {"max_steps": 10}) is None


# ----------------------------------------------------------------------------- suggest-lr


def test_suggest_lr_follows_the_fitted_rule():
    full = suggest_lr(2000, "llama", lora=False)
    assert full.lr == pytest.approx(5e-5)  # at hidden size 2000 the width factor is 1
    assert suggest_lr(2000, "llama", lora=True).lr / full.lr == pytest.approx(9.8)
    assert suggest_lr(4096, "llama", lora=False).lr == pytest.approx(5e-5 * (2000 / 4096) ** 0.781)
    assert suggest_lr(4096, "qwen", lora=True).lr == pytest.approx(5e-5 * 9.8 * (2000 / 4096) ** 0.0775)
    with pytest.raises(ValueError, match="mistral"):
        suggest_lr(4096, "mistral", lora=True)


def test_suggest_lr_cli():
    out = subprocess.run(
        [sys.executable, "-m", "rlora.cli", "suggest-lr", "--hidden-size", "4096", "--family", "llama", "--lora"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) == pytest.approx(5e-5 * 9.8 * (2000 / 4096) ** 0.781, rel=1e-2)


# ----------------------------------------------------------------------------- one tiny real sweep


@pytest.mark.slow
def test_tiny_real_sweep_end_to_end(tmp_path):
    """rlora sweep on the default model (rank 1 and FullFT x 2 lrs, 3 steps), a lost run resumed, rlora analyze."""
    out = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "rlora.cli", "sweep", "--config", "configs/sweep_sft_tiny.yaml", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["rank=1,lr=0.0001", "rank=1,lr=0.001", "rank=full,lr=0.0001", "rank=full,lr=0.001"]
    assert all(RunDir(out / r).status() == "done" for r in runs)

    # Lose the end of one run as a kill after its last checkpoint would: no done marker, the final
    # row torn. (A kill mid-run, resumed to the same numbers, is tests/test_sft.py's job.)
    victim = RunDir(out / "rank=1,lr=0.001")
    before = victim.read_metrics()
    lines = victim.metrics_path.read_text().splitlines(keepends=True)
    victim.metrics_path.write_text("".join(lines[:-1]) + lines[-1][:12])
    (victim.path / "done.json").unlink()
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 trained, 3 already done" in second.stdout
    rows = victim.read_metrics()
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[:3] == before[:3]  # resumed from the step-3 checkpoint, not trained again
    assert rows[-1]["eval_loss"] == pytest.approx(before[-1]["eval_loss"], abs=1e-6)
    assert json.loads((victim.path / "done.json").read_text())["resumed"] is True

    analysis = subprocess.run([sys.executable, "-m", "rlora.cli", "analyze", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    assert "| FullFT |" in analysis.stdout and "| 1 |" in analysis.stdout
    summary = json.loads((out / "analysis" / "summary.json").read_text())
    assert summary["runs"] == 4 and summary["panels"][0]["full"]["best"] is not None
    for name in ("heatmaps.png", "ucurves.png", "report.md"):
        assert (out / "analysis" / name).exists()
