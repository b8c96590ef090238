"""RL studies: an lr sweep, then several seeds at each arm's best lr; curves with 95% bands and CIs.

A study is a sweep (rlora.experiments.sweep) whose arms (FullFT; each LoRA rank under each alpha
rule) ran at several learning rates, then at several seeds at the best one (`seeds_at_best_lr`:
`add_seed_points` adds those runs once an arm's lr grid is done; `run_study` runs both phases).
`rlora analyze` (`analyze_study`) writes the sweep analysis (rlora.experiments.analyze: best lr,
bands, U-curves) and, for an RL study, puts in front of it, per arm at its seeded lr (the lr with
the most finished seeds; ties go to the best sweep metric):

- the reward curve: each seed smoothed by a trailing SMOOTH-step mean; the mean over seeds with a
  95% Student-t band (one seed: the line alone, and the report says "no band");
- the final reward: per seed, the mean reward of the last FINAL_STEPS training steps; the mean over
  seeds with a 95% t interval;
- the steps to reach TARGET_FRACTION of FullFT's final reward: per seed, the first step whose
  trailing SMOOTH-step mean reaches it, or "not reached"; a t interval only when every seed got
  there (otherwise a lower bound, the unreached seeds counted at max_steps);
- the held-out eval of the final policy: `eval/<bench>/avg@1` of the row at step max_steps
  (rlora.rl.loop logs it when `eval_every` is set), a t interval over seeds;
- against FullFT (the same non-LoRA settings): Welch t intervals of the differences in final
  reward and in steps (unpaired: see rlora.experiments.stats.welch_difference), and the best-lr
  ratio with an interval (`lr_ratio`, the estimator is documented there);
- and per alpha rule, how the best lr moves from the smallest to the largest rank: the ratio with
  the same kind of interval, the fitted exponent, and the exponent the rule predicts.

Everything goes to `summary.json` next to the sweep's numbers: each run's config and reward curve,
then every derived number, so a rerun on the same run directories rewrites the same file.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rlora.experiments.analyze import (
    FULL,
    METRICS,
    Analysis,
    Metric,
    RankSummary,
    RunResult,
    _jsonable,
    analyze,
    best_lr,
    better,
    make_curve,
    read_config,
    read_results,
    summarize_rank,
)
from rlora.experiments.stats import CONFIDENCE, Interval, first_crossing, mean_interval, pooled_sd, t_quantile, trailing_mean, welch_difference
from rlora.experiments.sweep import Sweep, arm_key, run_sweep, seed_point
from rlora.runs import RunDir

import matplotlib  # isort: skip

matplotlib.use("Agg")  # headless machines and CI
import matplotlib.pyplot as plt  # noqa: E402

FINAL_STEPS = 3  # the final reward of a run: the mean of its last 3 training steps
TARGET_FRACTION = 0.9  # steps to reach 90% of FullFT's final reward
SMOOTH = 3  # trailing window of the crossing and of the plotted curves (one step's 64 samples are noisy)
# best lr ~ rank^p under each alpha rule while B is small (rlora.train.lora's docstring)
EXPECTED_EXPONENT = {"constant": 0.0, "sqrt": -0.5, "per_rank": -1.0}
EVAL_SUFFIX = "/avg@1"


# ------------------------------------------------------------------------------------ the two phases of a study sweep


def add_seed_points(sweep: Sweep) -> Sweep:
    """The sweep plus, for every selected arm whose lr grid is done, one run per seed at its best grid lr.

    The best grid lr is the sweep analysis' (rlora.experiments.analyze.best_lr on the grid runs'
    final metric), taken from the grid's runs alone: the added seeds never move it. An arm whose
    every lr diverged gets no seeds. A seed already in the grid at that lr is not run twice."""
    if sweep.seed_phase is None:
        return sweep
    metric = METRICS[sweep.kind]
    arms: dict[tuple[tuple[str, object], ...], list[int]] = {}
    for i, point in enumerate(sweep.points):
        if sweep.seed_phase.selects(point):
            arms.setdefault(arm_key(point), []).append(i)
    names = {p.name for p in sweep.points}
    added = []
    for indices in arms.values():
        points = [sweep.points[i] for i in indices]
        if any(RunDir(sweep.out / p.name).status() != "done" for p in points):
            continue  # the grid of this arm is not finished: its seeds wait for a later invocation
        results = []
        for p in points:
            run_dir = sweep.out / p.name
            cfg = read_config(run_dir / "config.json") or {}
            value = metric.final(RunDir(run_dir).read_metrics(strict=True), cfg) if cfg else None
            results.append(RunResult(p.name, p.config.rank, float(p.config.lr), "", "", math.nan if value is None else value, str(run_dir)))
        best = best_lr(make_curve(results), metric)
        if best is None:
            continue
        template = next(p for p in points if float(p.config.lr) == best.grid_lr)
        for seed in sweep.seed_phase.seeds:
            point = seed_point(template, best.grid_lr, seed, sweep.out)
            if point.name not in names:
                names.add(point.name)
                added.append(point)
    return replace(sweep, points=sweep.points + tuple(added))


def run_study(sweep: Sweep, progress: bool = False, log: Callable[[str], None] = print, budget_s: float = 0.0) -> dict[str, list[str]]:
    """`rlora sweep` for a sweep with `seeds_at_best_lr`: the grid, then the seeds its finished arms unlock, until none are new.

    Stops at the first failed run (another pass would only retry it) and, with `budget_s`, once
    the budget is spent; the runs unlocked but not started are then listed as left."""
    t0 = time.time()
    outcome: dict[str, list[str]] = {"done": [], "skipped": [], "failed": [], "left": []}
    seen: set[str] = set()
    while True:
        expanded = add_seed_points(sweep)
        names = [p.name for p in expanded.points]
        if set(names) <= seen:
            return outcome  # nothing unlocked since the last pass
        left_s = budget_s - (time.time() - t0)
        if budget_s and left_s <= 0:
            outcome["left"] = [n for n in names if n not in seen and RunDir(sweep.out / n).status() != "done"]
            return outcome
        seen |= set(names)
        result = run_sweep(expanded, progress, log, left_s if budget_s else 0.0)
        outcome["done"] += result["done"]
        outcome["skipped"] = [n for n in result["skipped"] if n not in outcome["done"]]
        outcome["failed"], outcome["left"] = result["failed"], result["left"]
        if result["failed"] or result["left"]:
            return outcome


# ------------------------------------------------------------------------------------ reading a study's runs


@dataclass(frozen=True, kw_only=True)
class SeedRun:
    """One finished run of a study: what summary.json keeps of its raw metrics."""

    name: str  # its path under the study directory
    arm: str
    lr: float
    seed: int
    config: dict[str, object]  # config.json as saved
    steps: tuple[int, ...]  # the training steps (rows with a reward_mean)
    rewards_T: tuple[float, ...]  # reward_mean at each of `steps`
    final_reward: float  # mean of the last FINAL_STEPS training steps
    sweep_value: float  # the sweep's final metric (rlora.experiments.analyze.final_reward), nan if diverged
    final_eval: dict[str, float]  # eval/<bench>/avg@1 of the final policy (the row at step max_steps); {} without eval


def arm_name(result: RunResult) -> str:
    label = "FullFT" if result.rank == FULL else f"r={result.rank}"
    return f"{label} {result.panel}".strip()


def read_seed_run(result: RunResult) -> SeedRun:
    run_dir = Path(result.run_dir)
    cfg = read_config(run_dir / "config.json")
    assert cfg is not None, f"{run_dir}: read_results returned a run without a run config"
    rows = RunDir(run_dir).read_metrics(strict=True)
    train = [r for r in rows if "reward_mean" in r]
    if len(train) < FINAL_STEPS:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: {len(train)} rows with reward_mean, a study needs at least {FINAL_STEPS}")
    rewards_T = tuple(float(r["reward_mean"]) for r in train)  # type: ignore[arg-type]
    max_steps = cfg["max_steps"]
    final_row = next((r for r in reversed(rows) if r["step"] == max_steps and "reward_mean" not in r), {})
    final_eval = {k: float(v) for k, v in sorted(final_row.items()) if k.startswith("eval/") and k.endswith(EVAL_SUFFIX) and isinstance(v, (int, float))}
    return SeedRun(
        name=result.name,
        arm=arm_name(result),
        lr=result.lr,
        seed=int(cfg.get("seed", 0)),  # type: ignore[call-overload]
        config=cfg,
        steps=tuple(int(r["step"]) for r in train),  # type: ignore[call-overload]
        rewards_T=rewards_T,
        final_reward=sum(rewards_T[-FINAL_STEPS:]) / FINAL_STEPS,
        sweep_value=result.value,
        final_eval=final_eval,
    )


# ------------------------------------------------------------------------------------ per arm


@dataclass(frozen=True)
class BandCurve:
    """An arm's reward against step: each seed's trailing SMOOTH-step mean, then the mean over seeds and its t band."""

    steps: tuple[int, ...]  # the step that ends each window
    mean: tuple[float, ...]
    lo: tuple[float, ...] | None  # None with one seed: no band
    hi: tuple[float, ...] | None


@dataclass(frozen=True, kw_only=True)
class Arm:
    """One arm of the study at its seeded lr, plus its place in the lr sweep."""

    name: str  # "FullFT", "r=1 alpha_rule=constant"
    rank: int | str
    panel: str  # rlora.experiments.analyze's panel (the alpha rule for LoRA, the context for FullFT)
    context: str  # the non-LoRA settings: which FullFT arm it is compared with
    lr: float  # the seeded lr: most finished seeds, ties to the best sweep metric
    seeds: tuple[int, ...]
    runs: tuple[str, ...]  # the runs behind the numbers below, in seed order
    final_S: tuple[float, ...]  # final reward per seed
    final: Interval  # final reward over seeds
    target: float | None  # TARGET_FRACTION x the final reward of the FullFT arm it is compared with; None without one
    steps_to_target_S: tuple[int | None, ...]  # per seed; None = not reached
    steps: Interval | None  # over seeds, when every seed reached the target
    steps_lower_bound: float | None  # when some did not: the mean with those counted at max_steps
    evals: dict[str, Interval]  # benchmark -> held-out avg@1 of the final policy over seeds
    curve: BandCurve
    sweep: RankSummary  # the lr sweep of this arm, its band at `band_tol`
    band_tol: float  # the band's tolerance (see lr_band_tolerance)


def seeded_lr(runs: Sequence[SeedRun], metric: Metric) -> float:
    """The lr with the most finished seeds (the seed phase's); ties go to the best mean sweep metric."""
    by_lr: dict[float, list[float]] = {}
    for r in runs:
        by_lr.setdefault(r.lr, []).append(r.sweep_value)
    best = None
    for lr in sorted(by_lr):
        finite = [v for v in by_lr[lr] if math.isfinite(v)]
        value = sum(finite) / len(finite) if finite else math.nan
        key = (len(finite), value)
        if best is None or key[0] > best[1][0] or (key[0] == best[1][0] and math.isfinite(value) and better(metric, value, best[1][1])):
            best = (lr, key)
    assert best is not None, "seeded_lr of no runs"
    return best[0]


def band_curve(runs: Sequence[SeedRun]) -> BandCurve:
    """Each seed smoothed, cut to the steps every seed has, then the mean and t band per step."""
    common = sorted(set.intersection(*(set(r.steps) for r in runs)))
    smooth_S = []
    for r in runs:
        index = {s: i for i, s in enumerate(r.steps)}
        smooth_S.append(trailing_mean([r.rewards_T[index[s]] for s in common], SMOOTH))
    steps = tuple(common[SMOOTH - 1 :])
    per_step = [mean_interval([s[i] for s in smooth_S]) for i in range(len(steps))]
    mean = tuple(p.estimate for p in per_step)
    lo = tuple(p.lo for p in per_step if p.lo is not None)
    hi = tuple(p.hi for p in per_step if p.hi is not None)
    if len(runs) < 2:
        return BandCurve(steps, mean, None, None)
    return BandCurve(steps, mean, lo, hi)


def lr_band_tolerance(n_best: int, noise: tuple[float, int] | None, fallback: float) -> float:
    """How far below the best grid value an lr's sweep metric may fall and still count as the best.

    With the seed noise measured (`noise`: the within-(arm, lr) standard deviation of the sweep
    metric pooled over every (arm, lr) with >= 2 seeds, and its df), a single-seed lr is
    indistinguishable from the best grid lr (the mean of its `n_best` seeds) at 95% when its value
    is within t(df) * sd * sqrt(1 + 1 / n_best) of it: the half width of the difference's
    interval. Without two seeds anywhere, the analysis' fixed `--tol` (the report says so)."""
    if noise is None:
        return fallback
    sd, df = noise
    return t_quantile(0.5 + CONFIDENCE / 2, df) * sd * math.sqrt(1 + 1 / n_best)


def steps_summary(steps_S: Sequence[int | None], max_steps: int) -> tuple[Interval | None, float | None]:
    """A t interval when every seed reached the target; else a lower bound: unreached seeds counted at max_steps."""
    if all(s is not None for s in steps_S):
        return mean_interval([float(s) for s in steps_S if s is not None]), None
    return None, sum(float(max_steps if s is None else s) for s in steps_S) / len(steps_S)


# ------------------------------------------------------------------------------------ comparisons


@dataclass(frozen=True)
class Ratio:
    """A ratio of two best learning rates and an interval from their lr bands.

    estimate: the ratio of the interpolated best lrs (rlora.experiments.analyze.best_lr).
    Interval: every lr in the numerator's band divided by every lr in the denominator's:
    [num.lo / den.hi, num.hi / den.lo]. An lr in an arm's band is one whose sweep metric is not
    distinguishable from the best at 95% (lr_band_tolerance), so the interval holds every ratio
    of two such lrs: conservative (both ends at once), and coarse on a grid a half decade apart,
    but it needs no model of the U-curve. A band that reaches the grid's edge may extend further:
    that end is open (printed <= or >=)."""

    estimate: float | None
    lo: float | None
    hi: float | None
    lo_open: bool
    hi_open: bool

    def excludes_one(self) -> str:
        """'above' / 'below' when the interval lies wholly (and with a closed end) on one side of 1, else ''."""
        if self.lo is not None and self.lo > 1 and not self.lo_open:
            return "above"
        if self.hi is not None and self.hi < 1 and not self.hi_open:
            return "below"
        return ""


def lr_ratio(num: RankSummary, den: RankSummary) -> Ratio:
    estimate = num.best.lr / den.best.lr if num.best and den.best else None
    if num.band is None or den.band is None:
        return Ratio(estimate, None, None, False, False)
    return Ratio(estimate, num.band.lo / den.band.hi, num.band.hi / den.band.lo, num.band.lo_open or den.band.hi_open, num.band.hi_open or den.band.lo_open)


@dataclass(frozen=True)
class Versus:
    """A LoRA arm against the FullFT arm with its non-LoRA settings: the study's answer, one row."""

    arm: str
    full: str
    final_diff: Interval  # final reward, arm - FullFT (Welch)
    reaches: str  # does the arm reach FullFT's final reward: from final_diff's interval
    steps_diff: Interval | None  # steps to the target, arm - FullFT (Welch), when every seed of both reached it
    lr_ratio: Ratio  # best lr, arm / FullFT


def reaches_text(diff: Interval) -> str:
    if not diff.has_band:
        return "unknown: 1 seed, no band"
    if diff.excludes(0.0):
        return "yes, above FullFT" if diff.estimate > 0 else "no, below FullFT"
    return "no detectable gap at 95%"


def compare(arm: Arm, full: Arm) -> Versus:
    final_diff = welch_difference(arm.final_S, full.final_S)
    steps_diff = None
    if arm.steps is not None and full.steps is not None:
        steps_diff = welch_difference([float(s) for s in arm.steps_to_target_S if s is not None], [float(s) for s in full.steps_to_target_S if s is not None])
    return Versus(arm.name, full.name, final_diff, reaches_text(final_diff), steps_diff, lr_ratio(arm.sweep, full.sweep))


@dataclass(frozen=True)
class RuleRow:
    """An alpha rule: how the best lr moves from its smallest to its largest LoRA rank."""

    rule: str  # the panel: "alpha_rule=sqrt"
    ranks: tuple[int, ...]
    best_lrs: tuple[float | None, ...]  # interpolated, per rank
    ratio: Ratio  # best lr at the largest rank / at the smallest
    exponent: float | None  # p in best_lr ~ rank^p fitted over the ranks (rlora.experiments.analyze.rank_exponent)
    expected: float | None  # what the rule predicts (EXPECTED_EXPONENT)
    moves: str  # "falls with rank", "rises with rank", or "no detectable move"


def rule_row(panel: str, arms: Sequence[Arm], exponent: float | None) -> RuleRow:
    lora = sorted((a for a in arms if a.rank != FULL), key=lambda a: int(a.rank))
    ratio = lr_ratio(lora[-1].sweep, lora[0].sweep)
    side = ratio.excludes_one()
    moves = {"above": "rises with rank", "below": "falls with rank"}.get(side, "no detectable move")
    rule = panel.split("alpha_rule=")[-1].split(",")[0] if "alpha_rule=" in panel else "constant"
    return RuleRow(
        panel,
        tuple(int(a.rank) for a in lora),
        tuple(a.sweep.best.lr if a.sweep.best else None for a in lora),
        ratio,
        exponent,
        EXPECTED_EXPONENT.get(rule),
        moves,
    )


# ------------------------------------------------------------------------------------ the study


@dataclass(frozen=True, kw_only=True)
class Study:
    confidence: float
    final_steps: int
    target_fraction: float
    smooth: int
    noise_sd: float | None  # pooled within-(arm, lr) sd of the sweep metric (lr_band_tolerance)
    noise_df: int | None
    arms: tuple[Arm, ...]
    targets: dict[str, float]  # FullFT arm -> TARGET_FRACTION x its final reward
    versus: tuple[Versus, ...]
    rules: tuple[RuleRow, ...]
    runs: tuple[SeedRun, ...]
    figures: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _ArmRuns:
    """An arm's runs before the target is known."""

    result: RunResult  # one of them, for its rank, panel and context
    results: tuple[RunResult, ...]
    runs: tuple[SeedRun, ...]


def seeded_runs(group: _ArmRuns, metric: Metric) -> list[SeedRun]:
    """The arm's runs at its seeded lr, in seed order."""
    lr = seeded_lr(group.runs, metric)
    return sorted((r for r in group.runs if r.lr == lr), key=lambda r: (r.seed, r.name))


def build_arm(group: _ArmRuns, metric: Metric, noise: tuple[float, int] | None, tol: float, target: float | None, full_best: float | None) -> Arm:
    seeded = seeded_runs(group, metric)
    lr = seeded[0].lr
    max_steps = int(seeded[0].config["max_steps"])  # type: ignore[call-overload]
    steps_S = tuple(first_crossing(r.steps, r.rewards_T, target, SMOOTH) if target is not None else None for r in seeded)
    steps, lower = steps_summary(steps_S, max_steps) if target is not None else (None, None)
    benches = sorted(set.intersection(*(set(r.final_eval) for r in seeded)))
    n_best = max(1, sum(1 for r in seeded if math.isfinite(r.sweep_value)))
    band_tol = lr_band_tolerance(n_best, noise, tol)
    arm = Arm(
        name=seeded[0].arm,
        rank=group.result.rank,
        panel=group.result.panel,
        context=group.result.context,
        lr=lr,
        seeds=tuple(r.seed for r in seeded),
        runs=tuple(r.name for r in seeded),
        final_S=tuple(r.final_reward for r in seeded),
        final=mean_interval([r.final_reward for r in seeded]),
        target=target,
        steps_to_target_S=steps_S,
        steps=steps,
        steps_lower_bound=lower,
        evals={b.removeprefix("eval/").removesuffix(EVAL_SUFFIX): mean_interval([r.final_eval[b] for r in seeded]) for b in benches},
        curve=band_curve(seeded),
        sweep=summarize_rank(group.result.rank, group.results, metric, band_tol, full_best),
        band_tol=band_tol,
    )
    return arm


def build_study(sweep_dir: Path, tol: float, rank_exponents: dict[str, float | None]) -> Study:
    metric = METRICS["rl"]
    results, _ = read_results(sweep_dir, metric)
    results = sorted(results, key=lambda r: r.name)
    runs = [read_seed_run(r) for r in results]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(results):
        groups.setdefault((r.panel, str(r.rank)), []).append(i)
    arm_runs = {
        key: _ArmRuns(results[idx[0]], tuple(results[i] for i in idx), tuple(runs[i] for i in idx))
        for key, idx in sorted(groups.items(), key=lambda kv: (kv[0][1] != FULL, kv[0][0], int(kv[0][1]) if kv[0][1] != FULL else 0))
    }
    by_lr: dict[tuple[str, str, float], list[float]] = {}
    for r, run in zip(results, runs):
        if math.isfinite(run.sweep_value):
            by_lr.setdefault((r.panel, str(r.rank), r.lr), []).append(run.sweep_value)
    noise = pooled_sd(list(by_lr.values()))

    full_arms: dict[str, Arm] = {}
    targets: dict[str, float] = {}
    for key, group in arm_runs.items():
        if key[1] == FULL:
            finals = [r.final_reward for r in seeded_runs(group, metric)]
            target = TARGET_FRACTION * sum(finals) / len(finals)  # of its own final reward, seeds averaged
            full_arm = build_arm(group, metric, noise, tol, target, None)
            full_arms[group.result.context] = full_arm
            targets[full_arm.name] = target
    arms: list[Arm] = list(full_arms.values())
    versus = []
    for key, group in arm_runs.items():
        if key[1] == FULL:
            continue
        full = full_arms.get(group.result.context)
        arm_target = targets[full.name] if full else None  # no FullFT arm to compare with: no target
        arm = build_arm(group, metric, noise, tol, arm_target, full.sweep.best.lr if full and full.sweep.best else None)
        arms.append(arm)
        if full is not None:
            versus.append(compare(arm, full))
    rules = []
    for panel in sorted({a.panel for a in arms if a.rank != FULL}):
        in_panel = [a for a in arms if a.panel == panel and a.rank != FULL]
        if len(in_panel) >= 2:
            rules.append(rule_row(panel, in_panel, rank_exponents.get(panel)))
    return Study(
        confidence=CONFIDENCE,
        final_steps=FINAL_STEPS,
        target_fraction=TARGET_FRACTION,
        smooth=SMOOTH,
        noise_sd=noise[0] if noise else None,
        noise_df=noise[1] if noise else None,
        arms=tuple(arms),
        targets=targets,
        versus=tuple(versus),
        rules=tuple(rules),
        runs=tuple(runs),
    )


# ------------------------------------------------------------------------------------ figure


def plot_reward_bands(study: Study, out: Path) -> Path:
    """Per LoRA panel: each arm's smoothed reward at its seeded lr, mean and 95% band over seeds; FullFT in black.

    The dashed line is the target of the steps column (TARGET_FRACTION of FullFT's final reward)."""
    panels = sorted({a.panel for a in study.arms if a.rank != FULL}) or [""]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.9), squeeze=False, sharey=True)
    lora_ranks = sorted({int(a.rank) for a in study.arms if a.rank != FULL})
    cmap = plt.get_cmap("plasma")
    colors = {r: cmap(0.85 * i / max(1, len(lora_ranks) - 1)) for i, r in enumerate(lora_ranks)}
    for ax, panel in zip(axes[0], panels):
        in_panel = [a for a in study.arms if a.panel == panel and a.rank != FULL]
        contexts = {a.context for a in in_panel} or {a.context for a in study.arms}
        fulls = [a for a in study.arms if a.rank == FULL and a.context in contexts]
        for arm in [*in_panel, *fulls]:
            is_full = arm.rank == FULL
            color = "black" if is_full else colors[int(arm.rank)]
            label = f"{'FullFT' if is_full else f'r={arm.rank}'} lr={arm.lr:.0e}, {len(arm.seeds)} seed{'s' if len(arm.seeds) > 1 else ''}"
            if arm.curve.lo is None:
                label += " (no band)"
            ax.plot(arm.curve.steps, arm.curve.mean, color=color, lw=2.2 if is_full else 1.5, label=label)
            if arm.curve.lo is not None and arm.curve.hi is not None:
                ax.fill_between(arm.curve.steps, arm.curve.lo, arm.curve.hi, color=color, alpha=0.18, lw=0)
            if is_full and arm.name in study.targets:
                ax.axhline(study.targets[arm.name], color="black", ls="--", lw=0.8)
        ax.set_xlabel("step")
        ax.set_title(panel or "LoRA", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"reward ({SMOOTH}-step trailing mean)")
    fig.suptitle(f"each arm at its seeded lr: mean over seeds, {CONFIDENCE:.0%} t band; dashed: the steps target", fontsize=8, x=0.01, ha="left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------ report


def _num(x: float, digits: int) -> str:
    return f"{x:.{digits}f}"


def ci_text(iv: Interval | None, digits: int = 3, signed: bool = False) -> str:
    """'0.612 [0.551, 0.673]', or '0.612 (no band: 1 seed)' where one value cannot give an interval."""
    if iv is None:
        return "-"
    fmt = (lambda x: f"{x:+.{digits}f}") if signed else (lambda x: _num(x, digits))
    if iv.lo is None or iv.hi is None:
        return f"{fmt(iv.estimate)} (no band: 1 seed)"
    return f"{fmt(iv.estimate)} [{fmt(iv.lo)}, {fmt(iv.hi)}]"


def ratio_text(r: Ratio) -> str:
    if r.estimate is None:
        return "-"
    if r.lo is None or r.hi is None:
        return f"{r.estimate:.3g}"
    lo = ("<=" if r.lo_open else "") + f"{r.lo:.3g}"
    hi = (">=" if r.hi_open else "") + f"{r.hi:.3g}"
    return f"{r.estimate:.3g} [{lo}, {hi}]"


def steps_text(arm: Arm) -> str:
    if arm.target is None:
        return "- (no FullFT arm)"
    reached = sum(1 for s in arm.steps_to_target_S if s is not None)
    if arm.steps is not None:
        return ci_text(arm.steps, 1)
    if reached == 0:
        return f"not reached (0 of {len(arm.steps_to_target_S)} seeds)"
    return f">= {arm.steps_lower_bound:.1f} ({len(arm.steps_to_target_S) - reached} of {len(arm.steps_to_target_S)} seeds not reached)"


def study_report(study: Study, rel_figures: dict[str, str]) -> list[str]:
    """The study's section of report.md: the answer table, the alpha-rule table, how each number is made."""
    benches = sorted({b for a in study.arms for b in a.evals})
    versus = {v.arm: v for v in study.versus}
    conf = f"{study.confidence:.0%}"
    lines = [
        "# RL study: LoRA against FullFT over seeds",
        "",
        f"Each arm at its seeded lr (the lr with the most seeds: its best grid lr). Intervals are {conf} Student-t over seeds; "
        "differences (arm - FullFT) are Welch intervals; `no band: 1 seed` where a single run cannot give one.",
        "",
        "| arm | lr | seeds | final reward | - FullFT | reaches FullFT? | steps to target | - FullFT | best lr / FullFT's"
        + "".join(f" | held-out {b} avg@1" for b in benches)
        + " |",
        "| --- " * (9 + len(benches)) + "|",
    ]
    for arm in study.arms:
        v = versus.get(arm.name)
        cells = [
            arm.name,
            f"{arm.lr:.1e}",
            ",".join(str(s) for s in arm.seeds),
            ci_text(arm.final),
            ci_text(v.final_diff, signed=True) if v else "",
            v.reaches if v else "",
            steps_text(arm),
            (ci_text(v.steps_diff, 1, signed=True) if v.steps_diff else "- (a seed did not reach it)") if v else "",
            ratio_text(v.lr_ratio) if v else "",
            *(ci_text(arm.evals.get(b)) for b in benches),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if study.targets:
        lines.append("Target of the steps column: " + "; ".join(f"{k}: {v:.3f}" for k, v in study.targets.items()) + ".")
        lines.append("")
    if study.rules:
        lines += [
            "## Alpha rules: does the best lr move with rank?",
            "",
            "| rule | ranks | best lr per rank (interpolated) | best lr, largest / smallest rank | p fitted (best lr ~ rank^p) | p the rule predicts | moves with rank? |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in study.rules:
            best = ", ".join("-" if x is None else f"{x:.2e}" for x in row.best_lrs)
            p = "-" if row.exponent is None else f"{row.exponent:+.2f}"
            expected = "-" if row.expected is None else f"{row.expected:+.1f}"
            lines.append(f"| {row.rule} | {', '.join(map(str, row.ranks))} | {best} | {ratio_text(row.ratio)} | {p} | {expected} | {row.moves} |")
        lines.append("")
    for name, path in rel_figures.items():
        lines.append(f"![{name}]({path})")
    noise = (
        f"the seed noise of the sweep metric, sd {study.noise_sd:.3f} pooled over every (arm, lr) with >= 2 seeds ({study.noise_df} df)"
        if study.noise_sd is not None
        else "no (arm, lr) has two seeds, so the fixed `--tol` (not a measured noise level)"
    )
    lines += [
        "",
        "How the numbers are made:",
        f"- final reward: per seed, the mean reward of the last {study.final_steps} training steps;",
        f"- steps to target: per seed, the first step whose trailing {study.smooth}-step mean reward reaches "
        f"{study.target_fraction:.0%} of FullFT's final reward; with a seed that never does, a lower bound (that seed counted at max_steps) and no difference;",
        f"- best lr: the sweep's parabola in log10(lr); its interval: every lr in the arm's band over every lr in FullFT's band, "
        f"a band being the lrs whose sweep metric is not below the best grid value by more than the {conf} half width of a difference, from {noise}; "
        "`<=`/`>=` mark an end where a band reaches the edge of the lr grid;",
        "- held-out: greedy avg@1 of the final policy (the run's last eval row), over seeds.",
        "",
    ]
    return lines


# ------------------------------------------------------------------------------------ `rlora analyze`


def has_seeds(sweep_dir: Path) -> bool:
    """Whether some arm has >= 2 finished seeds at one lr: then the directory is a study."""
    results, _ = read_results(sweep_dir, METRICS["rl"])
    seeds: dict[tuple[str, str, float], set[int]] = {}
    for r in results:
        cfg = read_config(Path(r.run_dir) / "config.json") or {}
        seeds.setdefault((r.panel, str(r.rank), r.lr), set()).add(int(cfg.get("seed", 0)))  # type: ignore[call-overload]
    return any(len(s) >= 2 for s in seeds.values())


def analyze_study(
    sweep_dir: str | Path, out: str | Path | None = None, tol: float | None = None, kind: str | None = None, study: bool | None = None
) -> tuple[Analysis, Study | None]:
    """`rlora analyze`: the sweep analysis, and for an RL study (runs differing by seed, or `study=True`) the study in front of it.

    Rewrites report.md (the study's tables first) and summary.json (the sweep's numbers plus a
    `study` key), both deterministic functions of the run directories."""
    analysis = analyze(sweep_dir, out=out, tol=tol, kind=kind)
    sweep_dir = Path(sweep_dir)
    if study is None:
        study = analysis.kind == "rl" and has_seeds(sweep_dir)
    if not study:
        return analysis, None
    if analysis.kind != "rl":
        raise ValueError(f"a study analysis needs RL runs (a reward curve per step); {sweep_dir} holds {analysis.kind} runs")
    out_dir = Path(out) if out else sweep_dir / "analysis"
    result = build_study(sweep_dir, analysis.tol, {p.name: p.rank_exponent for p in analysis.panels})
    figure = plot_reward_bands(result, out_dir / "reward_bands.png")
    result = replace(result, figures={"reward bands": str(figure)})
    report = out_dir / "report.md"
    report.write_text("\n".join(study_report(result, {"reward bands": figure.name})) + "\n" + report.read_text())
    summary = {**asdict(analysis), "study": asdict(result)}
    (out_dir / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    return analysis, result
