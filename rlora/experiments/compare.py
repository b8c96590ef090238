"""`rlora compare RUN_DIR ... --out DIR`: runs side by side, e.g. rank 1, rank 32 and FullFT.

Reads run directories only (`config.json`, `metrics.jsonl`), never live objects. Writes
`compare.md`, one table with a column per run: its rank and learning rate, training reward
(mean of the last 5 steps, and the best single step) and every `eval/<benchmark>/<metric>` at
the run's last evaluated step (± its standard error where logged). Then one PNG per metric
against step: `reward_mean.png` and `eval_<benchmark>_<metric>.png`, one line per run, FullFT
(config rank "full") in black.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlora.experiments.plots import plot_metric
from rlora.runs import RunDir

Row = dict[str, object]
LAST = 5  # training reward is noisy: "final" is the mean over this many last steps


@dataclass(frozen=True)
class RunSummary:
    name: str  # label in the table and the legends
    config: dict[str, object]
    rows: list[Row]  # metrics.jsonl

    @property
    def is_full(self) -> bool:
        return self.config.get("rank") == "full"


def load_runs(paths: Sequence[str | Path]) -> list[RunSummary]:
    """Every run, checked before anything is written; labels are folder names (made unique)."""
    if not paths:
        raise ValueError("rlora compare needs at least one run directory")
    runs = []
    for path in paths:
        run = RunDir(path)
        if not run.config_path.exists():
            raise FileNotFoundError(f"{run.config_path} does not exist: {path} is not a run directory")
        rows = run.read_metrics()
        if not rows:
            raise FileNotFoundError(f"run {path} has no metrics yet ({run.metrics_path})")
        runs.append(RunSummary(Path(path).name, json.loads(run.config_path.read_text()), rows))
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # same folder names in different places: label by path
        runs = [RunSummary(str(Path(p)), r.config, r.rows) for p, r in zip(paths, runs)]
    return runs


def eval_keys(runs: Sequence[RunSummary]) -> list[str]:
    """`eval/...` metric keys logged by any run, standard errors and timings left out."""
    keys = {k for run in runs for row in run.rows for k in row if k.startswith("eval/") and not k.endswith("_se")}
    return sorted(keys)


def last_value(rows: Sequence[Row], key: str) -> tuple[int, float] | None:
    points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) is not None]  # type: ignore[call-overload, arg-type]
    return points[-1] if points else None


def table(runs: Sequence[RunSummary]) -> str:
    def cell(run: RunSummary, key: str) -> str:
        last = last_value(run.rows, key)
        if last is None:
            return "-"
        se = next((float(r[key + "_se"]) for r in run.rows if r.get("step") == last[0] and r.get(key + "_se") is not None), None)  # type: ignore[arg-type]
        return f"{last[1]:.3f}" + (f" ± {se:.3f}" if se is not None and np.isfinite(se) else "")

    def reward(run: RunSummary) -> np.ndarray:
        return np.array([float(r["reward_mean"]) for r in run.rows if "reward_mean" in r])  # type: ignore[arg-type]

    lines = ["| | " + " | ".join(r.name for r in runs) + " |", "| --- " * (len(runs) + 1) + "|"]
    add = lambda label, cells: lines.append(f"| {label} | " + " | ".join(cells) + " |")  # noqa: E731
    add("rank", [str(r.config.get("rank")) for r in runs])
    add("lr", [f"{r.config.get('lr'):g}" if isinstance(r.config.get("lr"), (int, float)) else "-" for r in runs])
    add("steps trained", [str(len(reward(r))) for r in runs])
    add(f"reward, last {LAST} steps", [f"{reward(r)[-LAST:].mean():.3f}" if len(reward(r)) else "-" for r in runs])
    add("reward, best step", [f"{reward(r).max():.3f}" if len(reward(r)) else "-" for r in runs])
    keys = eval_keys(runs)
    if keys:
        steps = [last_value(r.rows, keys[0]) for r in runs]
        add("last eval step", [str(s[0]) if s else "-" for s in steps])
    for key in keys:
        add(key, [cell(r, key) for r in runs])
    return "\n".join(lines) + "\n"


def compare(paths: Sequence[str | Path], out: str | Path, smooth: int = 1) -> str:
    """Write compare.md and the PNGs to `out`; return the table."""
    runs = load_runs(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    (out / "compare.md").write_text("# " + " vs ".join(r.name for r in runs) + "\n\n" + text)
    metrics = {r.name: r.rows for r in runs}
    full = [r.name for r in runs if r.is_full]
    plot_metric(metrics, "reward_mean", out / "reward_mean.png", full, "training reward" + (f" ({smooth}-step mean)" if smooth > 1 else ""), smooth)
    for key in eval_keys(runs):
        plot_metric(metrics, key, out / (key.replace("/", "_") + ".png"), full, key)
    return text
