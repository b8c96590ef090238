"""Plots read run directories (metrics.jsonl), never live objects. PNG out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import matplotlib

matplotlib.use("Agg")  # headless machines and CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_metric(
    runs: Mapping[str, Sequence[Mapping[str, object]]], key: str, out: Path, full_names: Sequence[str] = (), title: str = "", smooth: int = 1
) -> Path:
    """One line per run of `key` against step; FullFT runs (named in `full_names`) in black."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in runs.items():
        points = [(int(cast(float, r["step"])), float(cast(float, r[key]))) for r in rows if key in r and r[key] is not None]
        if not points:
            continue
        steps, values = zip(*points)
        if smooth > 1:  # trailing moving average, same length
            values = tuple(sum(values[max(0, i - smooth + 1) : i + 1]) / len(values[max(0, i - smooth + 1) : i + 1]) for i in range(len(values)))
        ax.plot(steps, values, label=name, color="black" if name in full_names else None, linewidth=2 if name in full_names else 1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title or key)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
