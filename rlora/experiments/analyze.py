"""Analysis of a learning-rate sweep: where the best learning rate is, and how it moves with rank.

Reads only run directories (`config.json`, `metrics.jsonl`) under a sweep directory, never live
objects, so it works on a finished sweep, a half-finished one, or synthetic runs in a test.

What it computes, for each panel (the runs that share every varied key except rank, lr and seed;
in the usual sweep, one alpha rule) and each rank:
- the final metric of each run: held-out log loss after the last step (sft), or the mean reward
  over the last 20% of steps (rl, whose per-step reward is noisy); several seeds are averaged;
- the best learning rate, interpolated: a parabola in log10(lr) through the best grid point and
  its two neighbours; its vertex, kept within those neighbours, is the estimate. For losses the
  parabola is fitted to log(loss): a loss U is lopsided (it climbs by orders of magnitude toward
  divergence) and a parabola in the loss itself puts its vertex far below every point it was
  fitted to. At the edge of the grid, or next to a diverged run, the best grid point is reported
  and flagged instead;
- its ratio to FullFT's best learning rate (FullFT runs with the same non-LoRA settings);
- the band: the contiguous learning rates around the best whose metric is within a tolerance of
  the best grid value (sft: relative, loss <= best * (1 + tol); rl: absolute, reward >= best - tol),
  as grid points and as an interval whose ends are interpolated where the curve crosses the
  threshold; and the band's intersection across the LoRA ranks of the panel: the learning rates
  one could reuse for every rank;
- the exponent p of best_lr ~ rank^p fitted over the LoRA ranks (0: flat, -1: falls like 1/r).

Outputs in `<sweep>/analysis/`: heatmaps.png (rank x lr per panel), ucurves.png (final metric
against lr, one line per rank, FullFT in black), best_lr.png (best lr against rank), one
learning-curve plot per panel, summary.json (every number above) and report.md. An RL study (arms
with several seeds at one lr) gets its seed statistics in front: rlora.experiments.study.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rlora.experiments.sweep import LORA_KEYS, SWEEP_FILE
from rlora.runs import RunDir, RunFileError

import matplotlib  # isort: skip

matplotlib.use("Agg")  # headless machines and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402

FULL = "full"
# Config keys that never define a panel: the two axes, the seed (averaged), and bookkeeping.
AXES = ("rank", "lr")
NOT_PANEL = ("rank", "lr", "seed", "run_dir", "device", "report_to")


# ------------------------------------------------------------------------------------ metrics


def signed(x: float, digits: int = 2) -> str:
    """`x` with its sign, never '-0.00': a value that rounds to zero prints as +0.00."""
    return f"{round(x, digits) + 0.0:+.{digits}f}"  # + 0.0 turns -0.0 into 0.0


def final_eval_loss(rows: Sequence[dict[str, object]], cfg: dict[str, object]) -> float | None:
    """The held-out loss in the last row (step == max_steps); None if the run has not finished."""
    last = [r for r in rows if r.get("step") == cfg["max_steps"] and "eval_loss" in r]
    return float(last[-1]["eval_loss"]) if last else None  # type: ignore[arg-type]


def final_reward(rows: Sequence[dict[str, object]], cfg: dict[str, object]) -> float | None:
    """Mean reward over the last 20% of steps (at least one); None if the run has not finished.

    Only training rows count: a run with periodic evaluation ends with a row of its own at
    step == max_steps that holds the final policy's held-out eval and no reward."""
    steps = int(cfg["max_steps"])  # type: ignore[call-overload]
    if not rows or int(rows[-1]["step"]) < steps - 1:  # type: ignore[call-overload]
        return None
    tail = [float(r["reward_mean"]) for r in rows if "reward_mean" in r and int(r["step"]) >= steps - max(1, steps // 5)]  # type: ignore[call-overload, arg-type]
    return float(np.mean(tail)) if tail else None


@dataclass(frozen=True)
class Metric:
    key: str  # the metrics.jsonl column behind it (for learning curves)
    goal: str  # "min" or "max"
    final: Callable[[Sequence[dict[str, object]], dict[str, object]], float | None]
    label: str
    tol_mode: str  # "relative" (value <= best * (1 + tol)) or "absolute" (value >= best - tol)
    default_tol: float
    log_fit: bool  # fit the parabola to log(value): losses span orders of magnitude across an lr grid
    curve_keys: tuple[tuple[str, int], ...]  # (metrics column, smoothing) for learning curves, first with >= 2 points


METRICS: dict[str, Metric] = {
    "sft": Metric("eval_loss", "min", final_eval_loss, "final held-out log loss (nats/token)", "relative", 0.05, True, (("eval_loss", 1), ("train_loss", 4))),
    "rl": Metric("reward_mean", "max", final_reward, "final reward (mean over the last 20% of steps)", "absolute", 0.05, False, (("reward_mean", 5),)),
}


def better(metric: Metric, a: float, b: float) -> bool:
    return a < b if metric.goal == "min" else a > b


def within(metric: Metric, value: float, best: float, tol: float) -> bool:
    if not math.isfinite(value):
        return False
    if metric.tol_mode == "relative":
        return value <= best * (1 + tol) if metric.goal == "min" else value >= best * (1 - tol)
    return value <= best + tol if metric.goal == "min" else value >= best - tol


def threshold(metric: Metric, best: float, tol: float) -> float:
    if metric.tol_mode == "relative":
        return best * (1 + tol) if metric.goal == "min" else best * (1 - tol)
    return best + tol if metric.goal == "min" else best - tol


# ------------------------------------------------------------------------------------ reading runs


@dataclass(frozen=True)
class RunResult:
    name: str
    rank: int | str
    lr: float
    panel: str  # varied keys other than rank, lr, seed ("" if none); for FullFT only the non-LoRA ones
    context: str  # the non-LoRA part of `panel`: which FullFT runs a LoRA panel is compared with
    value: float  # the final metric; nan when the run diverged
    run_dir: str


def _label(cfg: dict[str, object], keys: Sequence[str]) -> str:
    return ",".join(f"{k}={cfg[k]}" for k in keys)


def read_config(path: Path) -> dict[str, object] | None:
    """A run's saved config (`config.json`), or None when the JSON is some other file's (no rank and lr)."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunFileError(f"{path}: cannot read the run's config ({e})") from e
    return cfg if isinstance(cfg, dict) and "rank" in cfg and "lr" in cfg else None


def read_results(sweep_dir: Path, metric: Metric) -> tuple[list[RunResult], list[str]]:
    """Every finished run under `sweep_dir` (recursively), and the names of those not finished."""
    configs: dict[Path, dict[str, object]] = {}
    for config_path in sorted(sweep_dir.rglob("config.json")):
        cfg = read_config(config_path)
        if cfg is not None:  # a run's config, not some other file
            configs[config_path.parent] = cfg
    for metrics_path in sorted(sweep_dir.rglob("metrics.jsonl")):
        if metrics_path.parent not in configs and not (metrics_path.parent / "config.json").exists():
            raise RunFileError(f"{metrics_path}: a run's metrics without its config.json: which arm it belongs to is unknown")
    all_keys = sorted({k for c in configs.values() for k in c})
    varied = [k for k in all_keys if k not in NOT_PANEL and len({json.dumps(c.get(k)) for c in configs.values()}) > 1]
    lora_varied = [k for k in varied if k in LORA_KEYS]
    other_varied = [k for k in varied if k not in LORA_KEYS]
    results, unfinished = [], []
    for path, cfg in configs.items():
        value = metric.final(RunDir(path).read_metrics(strict=True), cfg)
        name = str(path.relative_to(sweep_dir))
        if value is None:
            unfinished.append(name)
            continue
        context = _label(cfg, other_varied)
        panel = context if cfg["rank"] == FULL else ",".join(p for p in (_label(cfg, lora_varied), context) if p)
        results.append(RunResult(name, cfg["rank"], float(cfg["lr"]), panel, context, value, str(path)))  # type: ignore[arg-type]
    return results, unfinished


# ------------------------------------------------------------------------------------ best lr and band


@dataclass(frozen=True)
class Curve:
    """One rank's final metric against lr (seeds averaged), sorted by lr."""

    lrs: tuple[float, ...]
    values: tuple[float, ...]  # nan = diverged (every seed)
    run_dirs: tuple[str, ...]  # one run behind each point (the first seed), for its learning curve


def make_curve(results: Sequence[RunResult]) -> Curve:
    by_lr: dict[float, list[RunResult]] = {}
    for r in sorted(results, key=lambda r: r.name):
        by_lr.setdefault(r.lr, []).append(r)
    lrs = tuple(sorted(by_lr))
    values = []
    for lr in lrs:
        finite = [r.value for r in by_lr[lr] if math.isfinite(r.value)]
        values.append(float(np.mean(finite)) if finite else float("nan"))
    return Curve(lrs, tuple(values), tuple(by_lr[lr][0].run_dir for lr in lrs))


@dataclass(frozen=True)
class BestLR:
    grid_lr: float  # the best grid point
    grid_value: float
    lr: float  # interpolated (== grid_lr when method is "grid")
    value: float  # the parabola's value at lr (== grid_value when method is "grid")
    method: str  # "parabola" or "grid"
    edge: str  # "" inside the grid; "low" / "high" when the best grid point is the smallest / largest lr


def best_lr(curve: Curve, metric: Metric) -> BestLR | None:
    """The best lr: a parabola in log10(lr) through the best grid point and its neighbours."""
    finite = [i for i, v in enumerate(curve.values) if math.isfinite(v)]
    if not finite:
        return None
    i = finite[0]
    for j in finite[1:]:
        if better(metric, curve.values[j], curve.values[i]):
            i = j
    lr, value = curve.lrs[i], curve.values[i]
    edge = "low" if i == 0 else "high" if i == len(curve.lrs) - 1 else ""
    if edge or not (math.isfinite(curve.values[i - 1]) and math.isfinite(curve.values[i + 1])):
        return BestLR(lr, value, lr, value, "grid", edge)
    x = np.log10(np.array(curve.lrs[i - 1 : i + 2]))
    y = np.array(curve.values[i - 1 : i + 2])
    if metric.log_fit:
        y = np.log(y)
    a, b, c = np.polyfit(x, y, 2)
    if a <= 0 if metric.goal == "min" else a >= 0:  # flat or the wrong way round: no vertex to trust
        return BestLR(lr, value, lr, value, "grid", edge)
    x_star = float(np.clip(-b / (2 * a), x[0], x[2]))
    y_star = float(a * x_star**2 + b * x_star + c)
    return BestLR(lr, value, float(10**x_star), math.exp(y_star) if metric.log_fit else y_star, "parabola", edge)


@dataclass(frozen=True)
class Band:
    grid: tuple[float, ...]  # the contiguous grid lrs around the best within tolerance
    lo: float  # interpolated ends of the band (log-linear crossing of the threshold)
    hi: float
    lo_open: bool  # the band reaches the grid's smallest lr: it may extend further
    hi_open: bool


def _crossing(x0: float, y0: float, x1: float, y1: float, level: float) -> float:
    """lr in [x0, x1] where the log-linear interpolation of the curve reaches `level`."""
    if not math.isfinite(y1):
        return x0  # the neighbour diverged: the band ends at the last good point
    t = (level - y0) / (y1 - y0) if y1 != y0 else 0.0
    return float(10 ** (math.log10(x0) + t * (math.log10(x1) - math.log10(x0))))


def band(curve: Curve, best: BestLR, metric: Metric, tol: float) -> Band:
    i = curve.lrs.index(best.grid_lr)
    level = threshold(metric, best.grid_value, tol)
    lo_i = i
    while lo_i > 0 and within(metric, curve.values[lo_i - 1], best.grid_value, tol):
        lo_i -= 1
    hi_i = i
    while hi_i < len(curve.lrs) - 1 and within(metric, curve.values[hi_i + 1], best.grid_value, tol):
        hi_i += 1
    lo = curve.lrs[0] if lo_i == 0 else _crossing(curve.lrs[lo_i], curve.values[lo_i], curve.lrs[lo_i - 1], curve.values[lo_i - 1], level)
    hi = curve.lrs[-1] if hi_i == len(curve.lrs) - 1 else _crossing(curve.lrs[hi_i], curve.values[hi_i], curve.lrs[hi_i + 1], curve.values[hi_i + 1], level)
    return Band(curve.lrs[lo_i : hi_i + 1], lo, hi, lo_i == 0, hi_i == len(curve.lrs) - 1)


# ------------------------------------------------------------------------------------ panels


@dataclass(frozen=True)
class RankSummary:
    rank: int | str
    curve: Curve
    best: BestLR | None  # None when every run diverged
    band: Band | None
    ratio_to_full: float | None  # best lr / FullFT's best lr


@dataclass(frozen=True)
class Panel:
    name: str  # e.g. "alpha_rule=constant"
    ranks: tuple[RankSummary, ...]  # LoRA ranks ascending
    full: RankSummary | None  # the FullFT reference with the same non-LoRA settings
    shared_grid: tuple[float, ...]  # grid lrs in every LoRA rank's band
    shared_lo: float | None  # intersection of the interpolated bands (None if empty)
    shared_hi: float | None
    rank_exponent: float | None  # p in best_lr ~ rank^p over the LoRA ranks (None with < 2 ranks)


@dataclass(frozen=True)
class Analysis:
    sweep_dir: str
    kind: str
    metric: str
    goal: str
    tol: float
    tol_mode: str
    panels: tuple[Panel, ...]
    unfinished: tuple[str, ...]
    diverged: tuple[str, ...]
    runs: int
    figures: dict[str, str] = field(default_factory=dict)


def summarize_rank(rank: int | str, results: Sequence[RunResult], metric: Metric, tol: float, full_best: float | None) -> RankSummary:
    curve = make_curve(results)
    best = best_lr(curve, metric)
    b = band(curve, best, metric, tol) if best else None
    ratio = best.lr / full_best if best and full_best else None
    return RankSummary(rank, curve, best, b, ratio)


def rank_exponent(ranks: Sequence[RankSummary]) -> float | None:
    points = [(math.log(float(r.rank)), math.log(r.best.lr)) for r in ranks if r.best]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def build_panels(results: Sequence[RunResult], metric: Metric, tol: float) -> tuple[Panel, ...]:
    full_by_context: dict[str, RankSummary] = {}
    for context in sorted({r.context for r in results if r.rank == FULL}):
        runs = [r for r in results if r.rank == FULL and r.context == context]
        full_by_context[context] = summarize_rank(FULL, runs, metric, tol, None)
    lora = [r for r in results if r.rank != FULL]
    panels = []
    for name in sorted({r.panel for r in lora}):
        in_panel = [r for r in lora if r.panel == name]
        context = in_panel[0].context
        full = full_by_context.get(context)
        full_best = full.best.lr if full and full.best else None
        ranks = tuple(
            summarize_rank(rank, [r for r in in_panel if r.rank == rank], metric, tol, full_best)
            for rank in sorted({r.rank for r in in_panel}, key=lambda x: int(x))
        )
        bands = [r.band for r in ranks if r.band]
        shared = tuple(sorted(set.intersection(*(set(b.grid) for b in bands)))) if bands else ()
        lo = max(b.lo for b in bands) if bands else None
        hi = min(b.hi for b in bands) if bands else None
        if lo is not None and hi is not None and lo > hi:
            lo = hi = None
        panels.append(Panel(name, ranks, full, shared, lo, hi, rank_exponent(ranks)))
    if not lora:  # a FullFT-only sweep: one panel per context, so the full curves still get a report
        panels = [Panel(c or FULL, (), f, (), None, None, None) for c, f in full_by_context.items()]
    return tuple(panels)


# ------------------------------------------------------------------------------------ figures


def _ranks_with_full(panel: Panel) -> list[RankSummary]:
    return list(panel.ranks) + ([panel.full] if panel.full else [])


def _norm(values: list[float], metric: Metric) -> Normalize:
    finite = [v for v in values if math.isfinite(v)]
    if metric.goal == "min" and finite and min(finite) > 0:
        return LogNorm(vmin=min(finite), vmax=max(finite))
    return Normalize(vmin=min(finite, default=0.0), vmax=max(finite, default=1.0))


def plot_heatmaps(panels: Sequence[Panel], metric: Metric, out: Path) -> Path:
    """Rank (rows, FullFT last) x lr (columns) per panel; the value in each cell; the row's best boxed."""
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 1, 3.6), squeeze=False)
    all_values = [v for p in panels for r in _ranks_with_full(p) for v in r.curve.values]
    norm = _norm(all_values, metric)
    cmap = plt.get_cmap("viridis_r" if metric.goal == "min" else "viridis").with_extremes(bad="lightgrey")
    image = None
    for ax, panel in zip(axes[0], panels):
        rows = _ranks_with_full(panel)
        lrs = sorted({lr for r in rows for lr in r.curve.lrs})
        grid = np.full((len(rows), len(lrs)), np.nan)
        for i, r in enumerate(rows):
            for lr, v in zip(r.curve.lrs, r.curve.values):
                grid[i, lrs.index(lr)] = v
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
        for i, r in enumerate(rows):
            for j, lr in enumerate(lrs):
                if lr not in r.curve.lrs:
                    continue
                v = grid[i, j]
                text = f"{v:.3g}" if math.isfinite(v) else "div"
                boxed = r.best is not None and lr == r.best.grid_lr
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=7 if len(lrs) <= 8 else 4.5,
                    color="black" if not boxed else "red",
                    fontweight="bold" if boxed else "normal",
                )
        ax.set_xticks(range(len(lrs)), [f"{lr:.0e}" for lr in lrs], rotation=45, fontsize=7)
        ax.set_yticks(range(len(rows)), [f"r={r.rank}" if r.rank != FULL else "FullFT" for r in rows], fontsize=8)
        ax.set_xlabel("learning rate")
        ax.set_title(panel.name or "LoRA", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, label=metric.label)
    fig.suptitle("best per row in red", fontsize=8, x=0.01, ha="left")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def _rank_colors(panels: Sequence[Panel]) -> dict[int | str, tuple[float, float, float, float]]:
    ranks = sorted({r.rank for p in panels for r in p.ranks}, key=lambda x: int(x))
    cmap = plt.get_cmap("plasma")
    return {rank: cmap(0.85 * i / max(1, len(ranks) - 1)) for i, rank in enumerate(ranks)}


def plot_ucurves(panels: Sequence[Panel], metric: Metric, out: Path) -> Path:
    """Final metric against lr, one line per rank, FullFT in black, stars at the interpolated best."""
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.8), squeeze=False, sharey=True)
    colors = _rank_colors(panels)
    for ax, panel in zip(axes[0], panels):
        for r in _ranks_with_full(panel):
            is_full = r.rank == FULL
            color = "black" if is_full else colors[r.rank]
            ax.plot(r.curve.lrs, r.curve.values, "o-", color=color, lw=2.2 if is_full else 1.4, ms=3.5, label="FullFT" if is_full else f"r={r.rank}")
            if r.best is not None:
                ax.plot([r.best.lr], [r.best.value], "*", color=color, ms=11, mec="white", mew=0.6)
        ax.set_xscale("log")
        if metric.goal == "min":
            ax.set_yscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(panel.name or "LoRA", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(metric.label)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_best_lr(panels: Sequence[Panel], out: Path) -> Path:
    """Interpolated best lr against rank, one line per panel; FullFT's best dashed; open markers at the grid's edge."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    drawn_full: set[float] = set()
    for k, panel in enumerate(panels):
        pts = [(int(r.rank), r.best) for r in panel.ranks if r.best]
        if not pts:
            continue
        color = f"C{k}"
        ax.plot([p[0] for p in pts], [b.lr for _, b in pts], "-", color=color, label=panel.name or "LoRA")
        for rank, b in pts:
            ax.plot([rank], [b.lr], "o", color=color, mfc="white" if b.edge else color)
        if panel.full and panel.full.best and panel.full.best.lr not in drawn_full:
            drawn_full.add(panel.full.best.lr)
            ax.axhline(panel.full.best.lr, color="black", ls="--", lw=1.2, label="FullFT best" if len(drawn_full) == 1 else None)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ranks = sorted({int(r.rank) for p in panels for r in p.ranks})
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("best learning rate (interpolated)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title("open marker: best at the edge of the lr grid", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_learning_curves(panel: Panel, metric: Metric, out: Path) -> Path | None:
    """The metric against step for each rank at its best grid lr (first seed), FullFT in black.

    A sweep that evaluates only at the end has one held-out point per run: the training loss
    (smoothed) is drawn instead, and the title says so."""
    from rlora.experiments.plots import plot_metric

    runs: dict[str, list[dict[str, object]]] = {}
    for r in _ranks_with_full(panel):
        if r.best is None:
            continue
        label = "FullFT" if r.rank == FULL else f"r={r.rank}"
        run_dir = r.curve.run_dirs[r.curve.lrs.index(r.best.grid_lr)]
        runs[f"{label} lr={r.best.grid_lr:.0e}"] = RunDir(run_dir).read_metrics()
    if not runs:
        return None
    full_names = [k for k in runs if k.startswith("FullFT")]
    for key, smooth in metric.curve_keys:
        if all(sum(1 for row in rows if key in row) >= 2 for rows in runs.values()):
            title = f"{panel.name or 'LoRA'}: {key}{f' (avg of {smooth})' if smooth > 1 else ''}, best lr per rank"
            return plot_metric(runs, key, out, full_names=full_names, title=title, smooth=smooth)
    return None


# ------------------------------------------------------------------------------------ report


def _lr(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _band_text(b: Band | None) -> str:
    if b is None:
        return "-"
    lo = ("<=" if b.lo_open else "") + f"{b.lo:.1e}"
    hi = f"{b.hi:.1e}" + ("+" if b.hi_open else "")
    return f"{lo} .. {hi} ({len(b.grid)} grid lrs)"


def _row(r: RankSummary) -> str:
    if r.best is None:
        return f"| {'FullFT' if r.rank == FULL else r.rank} | all diverged | | | | | |"
    b = r.best
    flag = {"low": " (lowest lr tried)", "high": " (highest lr tried)"}.get(b.edge, "")
    ratio = "-" if r.ratio_to_full is None else f"{r.ratio_to_full:.2f}"
    return (
        f"| {'FullFT' if r.rank == FULL else r.rank} | {b.grid_lr:.1e} | {b.grid_value:.4g} | {b.lr:.2e}{flag} | {b.method} | {ratio} | {_band_text(r.band)} |"
    )


def write_report(a: Analysis, metric: Metric, out: Path, rel_figures: dict[str, str]) -> Path:
    tol_text = f"within {a.tol:.0%} of the best (relative)" if a.tol_mode == "relative" else f"within {a.tol:g} of the best (absolute)"
    lines = [
        f"# Learning-rate sweep analysis: `{a.sweep_dir}`",
        "",
        f"- kind: {a.kind}; metric: {metric.label} ({'lower' if a.goal == 'min' else 'higher'} is better)",
        f"- runs read: {a.runs}; unfinished (left out): {len(a.unfinished)}; diverged: {len(a.diverged)}",
        f"- best lr: parabola in log10(lr) through the best grid point and its neighbours; band: contiguous lrs {tol_text}",
        "",
    ]
    for name, path in rel_figures.items():
        lines.append(f"![{name}]({path})")
    lines.append("")
    for p in a.panels:
        lines += [
            f"## {p.name or 'LoRA'}",
            "",
            "| rank | best grid lr | its value | best lr (interpolated) | method | / FullFT best | band |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *[_row(r) for r in _ranks_with_full(p)],
            "",
        ]
        if p.ranks:
            shared = ", ".join(f"{x:.1e}" for x in p.shared_grid) or "none"
            interval = "empty" if p.shared_lo is None else f"{p.shared_lo:.1e} .. {p.shared_hi:.1e}"
            exponent = "-" if p.rank_exponent is None else signed(p.rank_exponent)
            lines += [
                f"- reusable band (in every LoRA rank's band): grid lrs {shared}; interpolated {interval}",
                f"- best lr ~ rank^p over the LoRA ranks: p = {exponent} (0 = flat, -0.5 = like 1/sqrt(r), -1 = like 1/r)",
                "",
            ]
    if a.unfinished:
        lines += ["Unfinished runs (not in the analysis): " + ", ".join(a.unfinished), ""]
    if a.diverged:
        lines += ["Diverged runs (NaN loss, shown as `div`): " + ", ".join(a.diverged), ""]
    out.write_text("\n".join(lines))
    return out


def _jsonable(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def analyze(sweep_dir: str | Path, out: str | Path | None = None, tol: float | None = None, kind: str | None = None) -> Analysis:
    """Read every run under `sweep_dir`, compute the best lrs and bands, write figures and report.md."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    record = sweep_dir / SWEEP_FILE
    if kind is None:
        kind = json.loads(record.read_text())["kind"] if record.exists() else "sft"
    if kind not in METRICS:
        raise ValueError(f"unknown sweep kind {kind!r}; known: {sorted(METRICS)}")
    metric = METRICS[kind]
    tol = metric.default_tol if tol is None else tol
    results, unfinished = read_results(sweep_dir, metric)
    if not results:
        raise FileNotFoundError(f"no finished runs under {sweep_dir} ({len(unfinished)} unfinished)")
    panels = build_panels(results, metric, tol)
    out_dir = Path(out) if out else sweep_dir / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "heatmaps": plot_heatmaps(panels, metric, out_dir / "heatmaps.png"),
        "ucurves": plot_ucurves(panels, metric, out_dir / "ucurves.png"),
    }
    if any(r.best for p in panels for r in p.ranks):
        figures["best_lr"] = plot_best_lr(panels, out_dir / "best_lr.png")
    for k, panel in enumerate(panels):
        path = plot_learning_curves(panel, metric, out_dir / f"curves_{k}_{(panel.name or 'lora').replace('=', '_').replace(',', '_')}.png")
        if path is not None:
            figures[f"curves {panel.name}"] = path
    diverged = tuple(sorted(r.name for r in results if not math.isfinite(r.value)))
    analysis = Analysis(
        str(sweep_dir),
        kind,
        metric.key,
        metric.goal,
        tol,
        metric.tol_mode,
        panels,
        tuple(sorted(unfinished)),
        diverged,
        len(results),
        {k: str(v) for k, v in figures.items()},
    )
    rel = {k: str(Path(v).relative_to(out_dir)) if Path(v).is_relative_to(out_dir) else str(v) for k, v in figures.items()}
    write_report(analysis, metric, out_dir / "report.md", rel)
    (out_dir / "summary.json").write_text(json.dumps(_jsonable(asdict(analysis)), indent=2) + "\n")
    return analysis
