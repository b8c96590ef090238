"""RL study analysis on synthetic run directories (no engine): t intervals against hand
computations, steps to 90% of FullFT with a seed that never gets there, the best-lr ratio and its
interval, the alpha-rule table, one seed ("no band"), a deterministic summary.json, clear errors
for bad files; and the sweep's seed phase (`seeds_at_best_lr`) with a fake RL entry point."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlora.config import ConfigError, RLConfig, save_config
from rlora.experiments import sweep as sweep_mod
from rlora.experiments.analyze import RunFileError
from rlora.experiments.stats import first_crossing, mean_interval, pooled_sd, t_quantile, welch_difference
from rlora.experiments.study import add_seed_points, analyze_study, run_study
from rlora.experiments.sweep import Kind, load_sweep, run_worker
from rlora.runs import RunDir

STEPS = 10  # max_steps of every synthetic run; the sweep metric reads steps 8 and 9, the final reward steps 7-9


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (6, 2.4469), (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_the_printed_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_mean_interval_and_welch_by_hand():
    iv = mean_interval([0.5, 0.6, 0.7])  # sd 0.1, se 0.1 / sqrt(3), t(2) = 4.302653
    assert iv.estimate == pytest.approx(0.6) and iv.hi - 0.6 == pytest.approx(4.302653 * 0.1 / math.sqrt(3), abs=1e-6)
    one = mean_interval([0.4])
    assert one.lo is None and not one.has_band
    # equal n and variance: Welch's df is 2 (n - 1) = 4
    d = welch_difference([0.7, 0.8, 0.75], [0.8, 0.85, 0.9])
    assert d.df == pytest.approx(4) and d.estimate == pytest.approx(-0.1)
    assert d.hi - d.estimate == pytest.approx(2.776445 * math.sqrt(2 * 0.0025 / 3), abs=1e-6)
    assert pooled_sd([[1.0, 3.0], [5.0], [2.0, 4.0, 6.0]]) == pytest.approx((math.sqrt((2 + 8) / 3), 3))


def test_first_crossing_uses_full_trailing_windows():
    values = [0.0, 0.9, 0.9, 0.9, 0.9]
    assert first_crossing(range(5), values, 0.85, 3) == 3  # (0.9 + 0.9 + 0.9) / 3; step 2's window still holds the 0
    assert first_crossing(range(5), values, 0.95, 3) is None


# ----------------------------------------------------------------------------- synthetic studies


def write_run(
    root: Path, name: str, *, rank: int | str, lr: float, seed: int, rewards: list[float], alpha_rule: str = "constant", final_eval: float | None = None
) -> Path:
    """A finished RL run directory: config.json, one metrics row per step, the final policy's eval row, done.json."""
    path = root / name
    path.mkdir(parents=True)
    save_config(RLConfig(rank=rank, lr=lr, seed=seed, alpha_rule=alpha_rule, max_steps=len(rewards), run_dir=str(path)), path / "config.json")
    run = RunDir(path)
    for step, reward in enumerate(rewards):
        run.log({"step": step, "reward_mean": reward})
    if final_eval is not None:
        run.log({"step": len(rewards), "eval/arith_chain/avg@1": final_eval, "eval/arith_chain/avg@1_se": 0.05})
    run.mark_done(1.0, resumed=False)
    return path


def step_curve(jump: int, plateau: float) -> list[float]:
    """0.1 before step `jump`, `plateau` from it on: the trailing 3-step mean reaches plateau at jump + 2."""
    return [0.1 if s < jump else plateau for s in range(STEPS)]


# per arm: (rank, lrs, value at the two outer lrs, plateau per seed at the middle lr, jump per seed, final eval per seed)
FULL = ("full", (1e-5, 3e-5, 1e-4), 0.5, (0.80, 0.85, 0.90), (2, 3, 4), (0.5, 0.6, 0.7))
R1 = (1, (1e-4, 3e-4, 1e-3), 0.4, (0.70, 0.80, 0.75), (3, 4, 5), (0.4, 0.5, 0.6))
R8 = (8, (1e-4, 3e-4, 1e-3), 0.5, (0.80, 0.85, 0.90), (3, 4, 5), (0.5, 0.5, 0.5))
TARGET = 0.9 * 0.85  # 90% of FullFT's final reward


def write_arm(root: Path, arm: tuple, seeds: tuple[int, ...] = (0, 1, 2), alpha_rule: str = "constant") -> None:
    rank, lrs, outer, plateaus, jumps, evals = arm
    for lr in (lrs[0], lrs[2]):
        write_run(root, f"r{rank}-{alpha_rule}-{lr:g}-s0", rank=rank, lr=lr, seed=0, rewards=[outer] * STEPS, alpha_rule=alpha_rule, final_eval=0.3)
    for seed in seeds:
        write_run(
            root,
            f"r{rank}-{alpha_rule}-{lrs[1]:g}-s{seed}",
            rank=rank,
            lr=lrs[1],
            seed=seed,
            rewards=step_curve(jumps[seed], plateaus[seed]),
            alpha_rule=alpha_rule,
            final_eval=evals[seed],
        )


@pytest.fixture
def study_dir(tmp_path: Path) -> Path:
    root = tmp_path / "study"
    for arm in (FULL, R1, R8):
        write_arm(root, arm)
    # the alpha rule per_rank, one seed: rank 1 best at 1e-2, rank 64 at 1e-4 (falls like 1/r)
    write_arm(root, (1, (3e-3, 1e-2, 3e-2), 0.4, (0.8,), (3,), (0.5,)), seeds=(0,), alpha_rule="per_rank")
    write_arm(root, (64, (3e-5, 1e-4, 3e-4), 0.4, (0.8,), (3,), (0.5,)), seeds=(0,), alpha_rule="per_rank")
    (root / "sweep.json").write_text(json.dumps({"kind": "rl"}))
    return root


def test_study_numbers_match_a_hand_computation(study_dir):
    _, study = analyze_study(study_dir)  # detected: arms with 3 seeds at one lr
    assert study is not None
    arms = {a.name: a for a in study.arms}
    assert list(arms)[0] == "FullFT"
    full, r1, r8 = arms["FullFT"], arms["r=1 alpha_rule=constant"], arms["r=8 alpha_rule=constant"]
    assert full.lr == 3e-5 and full.seeds == (0, 1, 2) and r1.lr == 3e-4

    # final reward: mean of the last 3 steps per seed (the plateau), t(2) interval over 3 seeds
    assert full.final.estimate == pytest.approx(0.85)
    assert full.final.hi - 0.85 == pytest.approx(4.302653 * 0.05 / math.sqrt(3), abs=1e-6)
    assert study.targets == {"FullFT": pytest.approx(TARGET)}

    # steps to 90% of FullFT: jump + 2 where the plateau reaches the target
    assert full.steps_to_target_S == (4, 5, 6) and full.steps.estimate == pytest.approx(5)
    assert r8.steps_to_target_S == (5, 6, 7)
    assert r1.steps_to_target_S == (None, 6, None)  # plateaus 0.70 and 0.75 stay below 0.765
    assert r1.steps is None and r1.steps_lower_bound == pytest.approx((10 + 6 + 10) / 3)

    versus = {v.arm: v for v in study.versus}
    v1, v8 = versus["r=1 alpha_rule=constant"], versus["r=8 alpha_rule=constant"]
    half = 2.776445 * math.sqrt(2 * 0.0025 / 3)  # Welch, equal variances and n: df 4
    assert v1.final_diff.estimate == pytest.approx(-0.1) and v1.final_diff.hi == pytest.approx(-0.1 + half, abs=1e-6)
    assert v1.reaches == "no detectable gap at 95%" and v1.steps_diff is None
    assert v8.steps_diff.estimate == pytest.approx(1.0) and v8.steps_diff.hi == pytest.approx(1 + 2.776445 * math.sqrt(2 / 3), abs=1e-6)

    # best-lr ratio: both U-curves symmetric in log lr, so the parabolas put the best at the middle lrs: 10x
    assert v1.lr_ratio.estimate == pytest.approx(10.0)
    # the interval: bands at the pooled seed noise (sd 0.05, 6 df) for a 1-seed lr against the 3-seed best
    assert study.noise_sd == pytest.approx(0.05) and study.noise_df == 6
    tol = 2.446912 * 0.05 * math.sqrt(1 + 1 / 3)
    assert full.band_tol == pytest.approx(tol, abs=1e-6)
    # both arms fall by 0.35 to neighbours log10(3) below and log10(10/3) above: each band end sits a fraction
    # tol / 0.35 of the way there, so [lo(r1) / hi(FullFT), hi(r1) / lo(FullFT)] spans 10 * 10^(+-tol / 0.35 * log10(3 * 10/3))
    assert math.log10(v1.lr_ratio.lo) == pytest.approx(1 - tol / 0.35, abs=1e-6)
    assert math.log10(v1.lr_ratio.hi) == pytest.approx(1 + tol / 0.35, abs=1e-6)
    assert not v1.lr_ratio.lo_open and v1.lr_ratio.excludes_one() == "above"

    # held-out eval of the final policy over seeds
    assert full.evals["arith_chain"].estimate == pytest.approx(0.6)
    assert full.evals["arith_chain"].hi == pytest.approx(0.6 + 4.302653 * 0.1 / math.sqrt(3), abs=1e-6)

    rules = {r.rule: r for r in study.rules}
    per_rank = rules["alpha_rule=per_rank"]
    assert per_rank.ranks == (1, 64) and per_rank.ratio.estimate == pytest.approx(1e-2)
    assert per_rank.moves == "falls with rank" and per_rank.expected == -1.0
    assert per_rank.exponent == pytest.approx(math.log(1e-2) / math.log(64))
    assert rules["alpha_rule=constant"].moves == "no detectable move"

    report = (study_dir / "analysis" / "report.md").read_text()
    assert report.startswith("# RL study")
    assert "not reached" in report and "2 of 3 seeds not reached" in report
    assert "# Learning-rate sweep analysis" in report  # the sweep's own report follows
    assert (study_dir / "analysis" / "reward_bands.png").stat().st_size > 0


def test_summary_json_is_regenerated_identically(study_dir, tmp_path):
    out = tmp_path / "docs"
    analyze_study(study_dir, out=out)
    first = (out / "summary.json").read_bytes()
    first_report = (out / "report.md").read_text()
    analyze_study(study_dir, out=out)
    assert (out / "summary.json").read_bytes() == first
    assert (out / "report.md").read_text() == first_report
    summary = json.loads(first)
    run = next(r for r in summary["study"]["runs"] if r["name"] == "rfull-constant-3e-05-s1")
    assert run["config"]["seed"] == 1 and run["final_reward"] == pytest.approx(0.85) and len(run["rewards_T"]) == STEPS
    assert run["final_eval"] == {"eval/arith_chain/avg@1": 0.6}
    assert summary["panels"] and summary["study"]["versus"][0]["arm"] == "r=1 alpha_rule=constant"


def test_one_seed_study_says_no_band(tmp_path):
    root = tmp_path / "one"
    write_arm(root, FULL, seeds=(0,))
    write_arm(root, R1, seeds=(0,))
    (root / "sweep.json").write_text(json.dumps({"kind": "rl"}))
    _, detected = analyze_study(root)
    assert detected is None  # one seed everywhere: a plain sweep unless asked
    _, study = analyze_study(root, study=True)
    arm = study.arms[0]
    assert arm.final.lo is None and arm.curve.lo is None
    assert study.noise_sd is None and arm.band_tol == pytest.approx(0.05)  # the fixed --tol
    report = (root / "analysis" / "report.md").read_text()
    assert "no band: 1 seed" in report and "unknown: 1 seed, no band" in report and "fixed `--tol`" in report


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: (run / "config.json").write_text("{not json"), r"config.json: cannot read"),
        (lambda run: (run / "metrics.jsonl").unlink(), r"metrics.jsonl: missing, but the run is marked done"),
        (lambda run: (run / "metrics.jsonl").write_text('{"step": 0, "reward_mean": 0.1}\nnope\n{"step": 2}\n'), r"metrics.jsonl:2: not a JSON row"),
        (lambda run: (run / "config.json").unlink(), r"metrics.jsonl: a run's metrics without its config.json"),
    ],
)
def test_bad_or_missing_files_are_named(study_dir, damage, message):
    run = study_dir / "r1-constant-0.0003-s1"
    damage(run)
    with pytest.raises(RunFileError, match=message) as e:
        analyze_study(study_dir)
    assert "r1-constant-0.0003-s1" in str(e.value)


# ----------------------------------------------------------------------------- the seed phase of a study sweep


class FakeRL:
    """Stands in for `rlora rl`: a flat reward that peaks at lr 1e-3 (FullFT: 1e-4)."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def start(self, cfg: RLConfig, name: str, progress: bool) -> RunDir:
        self.started.append(name)
        path = Path(str(cfg.run_dir))
        path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, path / "config.json")
        best = 1e-4 if cfg.rank == "full" else 1e-3
        reward = 0.9 - 0.2 * abs(math.log10(cfg.lr / best)) + 0.01 * cfg.seed
        run = RunDir(path)
        for step in range(cfg.max_steps):
            run.log({"step": step, "reward_mean": reward})
        return run

    def resume(self, path: Path, progress: bool) -> RunDir:
        raise AssertionError("nothing to resume here")


@pytest.fixture
def fake_rl(monkeypatch):
    trainer = FakeRL()
    monkeypatch.setitem(sweep_mod.KINDS, "rl", Kind(lambda: RLConfig, trainer.start, trainer.resume))
    return trainer


STUDY_SWEEP = """
kind: rl
fixed: {max_steps: 5}
grid:
  - {rank: [full], lr: [3.0e-5, 1.0e-4, 3.0e-4]}
  - {rank: [1], alpha_rule: [constant, sqrt], lr: [3.0e-4, 1.0e-3, 3.0e-3]}
seeds_at_best_lr:
  seeds: [1, 2]
  arms: {alpha_rule: [constant]}
"""


def test_seeds_join_once_the_lr_grid_is_done(tmp_path, fake_rl):
    (tmp_path / "s.yaml").write_text(STUDY_SWEEP)
    sweep = load_sweep(tmp_path / "s.yaml", out=tmp_path / "out")
    assert len(add_seed_points(sweep).points) == 9  # nothing finished: no seeds yet
    run_worker(sweep, log=lambda s: None)
    expanded = add_seed_points(sweep)
    added = [p.name for p in expanded.points[9:]]
    # FullFT and constant alpha get seeds at their best grid lr; sqrt is not selected
    assert added == [
        "rank=full,lr=0.0001,seed=1",
        "rank=full,lr=0.0001,seed=2",
        "rank=1,alpha_rule=constant,lr=0.001,seed=1",
        "rank=1,alpha_rule=constant,lr=0.001,seed=2",
    ]
    assert expanded.points[-1].config.seed == 2 and expanded.points[-1].config.lr == 1e-3


def test_run_study_runs_both_phases_then_nothing(tmp_path, fake_rl):
    (tmp_path / "s.yaml").write_text(STUDY_SWEEP)
    sweep = load_sweep(tmp_path / "s.yaml", out=tmp_path / "out")
    first = run_study(sweep, log=lambda s: None)
    assert len(first["done"]) == 13 and not first["failed"] and not first["left"]
    again = run_study(sweep, log=lambda s: None)
    assert again["done"] == [] and len(again["skipped"]) == 13
    _, study = analyze_study(tmp_path / "out")
    arms = {a.name: a for a in study.arms}
    assert arms["FullFT"].seeds == (0, 1, 2) and arms["r=1 alpha_rule=sqrt"].seeds == (0,)


@pytest.mark.parametrize(
    "phase, message",
    [
        ("seeds_at_best_lr: [1, 2]", "must be a mapping with 'seeds'"),
        ("seeds_at_best_lr: {seeds: []}", "non-empty list of ints"),
        ("seeds_at_best_lr: {seeds: [1], arms: {alpha_rul: [sqrt]}}", "'alpha_rul'"),
        ("seeds_at_best_lr: {seeds: [1], arms: {lr: [0.1]}}", "other than lr and seed"),
    ],
)
def test_bad_seed_phases_name_the_key(tmp_path, phase, message):
    (tmp_path / "s.yaml").write_text(f"kind: rl\ngrid: {{rank: [1], lr: [0.1]}}\n{phase}\n")
    with pytest.raises(ConfigError, match=message):
        load_sweep(tmp_path / "s.yaml")


def test_study_preset_expands():
    sweep = load_sweep(Path(__file__).resolve().parents[1] / "configs" / "study_rl_cpu.yaml")
    ranks = {(p.config.rank, p.config.alpha_rule if p.config.rank != "full" else "") for p in sweep.points}
    assert ranks == {("full", ""), (1, "constant"), (8, "constant"), (64, "constant"), (1, "per_rank"), (64, "per_rank"), (1, "sqrt"), (64, "sqrt")}
    assert sweep.seed_phase is not None and sweep.seed_phase.seeds == (1, 2)
    assert all(sum(1 for p in sweep.points if (p.config.rank, p.config.alpha_rule) == (r, a)) >= 3 for r, a in ranks if r != "full")


def test_a_study_without_fullft_has_no_steps_target(tmp_path):
    root = tmp_path / "lora_only"
    write_arm(root, R1)
    _, study = analyze_study(root, kind="rl")
    assert study.arms[0].target is None and study.arms[0].steps_to_target_S == (None, None, None) and study.versus == ()
    assert "- (no FullFT arm)" in (root / "analysis" / "report.md").read_text()


def test_committed_study_report_is_what_its_committed_runs_give(tmp_path, monkeypatch):
    """docs/study_rl_cpu/summary.json and report.md are regenerated from docs/study_rl_cpu/runs
    (the study's raw data, kept in git across sittings): a run added without rerunning the
    analysis, or an analysis change that moves a published number, fails here."""
    root = Path(__file__).resolve().parents[1]
    committed = root / "docs" / "study_rl_cpu"
    monkeypatch.chdir(root)  # run paths in summary.json are as `rlora analyze docs/study_rl_cpu/runs` writes them
    analyze_study("docs/study_rl_cpu/runs", out=tmp_path)
    for name in ("summary.json", "report.md"):
        regenerated = (tmp_path / name).read_text().replace(str(tmp_path), "docs/study_rl_cpu")
        assert regenerated == (committed / name).read_text(), (
            f"docs/study_rl_cpu/{name} is stale: rerun rlora analyze docs/study_rl_cpu/runs --out docs/study_rl_cpu"
        )
    summary = json.loads((committed / "summary.json").read_text())
    ranks = {v["arm"].split()[0] for v in summary["study"]["versus"]}  # "r=8" or "r=8 alpha_rule=constant"
    assert {"r=1", "r=8", "r=64"} <= ranks
    assert all(r["config"]["dtype"] == "float32" and r["config"]["max_steps"] == 20 for r in summary["study"]["runs"])
