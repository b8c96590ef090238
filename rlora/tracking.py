"""Experiment tracking: every metrics row also goes to TensorBoard and/or Weights & Biases.

`metrics.jsonl` stays the source of truth (analysis, resume and plots read it); a tracker is a
live view of the same rows. Numeric values are logged under their metrics.jsonl key at the row's
`step`; strings and missing values are skipped. Off by default (`report_to: ""`); the packages
come with the `track` extra (`pip install -e ".[track]"`).

W&B: with no `WANDB_MODE` and no `WANDB_API_KEY` in the environment the run is logged in offline
mode into `<run>/wandb/` (sync later with `wandb sync`), so a machine without network never waits.
A resumed run appends to the same W&B run (its id is the run directory's name and a hash of its path).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol


class Tracker(Protocol):
    def log(self, row: Mapping[str, object]) -> None: ...

    def close(self) -> None: ...


def numeric(row: Mapping[str, object]) -> dict[str, float]:
    """The row's finite-or-NaN numbers (bools as 0/1), without `step`."""
    out = {}
    for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)):
            out[key] = float(value)
    return out


class TensorBoardTracker:
    """Scalars in `<run>/tensorboard/`: `tensorboard --logdir runs/`."""

    def __init__(self, run_path: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_path / "tensorboard"))

    def log(self, row: Mapping[str, object]) -> None:
        step = int(row.get("step", 0))  # type: ignore[call-overload]
        for key, value in numeric(row).items():
            if not math.isnan(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per run directory, its config from config.json; offline unless the environment says otherwise."""

    def __init__(self, run_path: Path) -> None:
        import wandb

        config_path = run_path / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        if "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
        run_id = f"{run_path.name}-{hashlib.sha1(str(run_path.resolve()).encode()).hexdigest()[:8]}"
        run_id = "".join(c if c.isalnum() or c in "-_" else "_" for c in run_id)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "rlora"),
            name=run_path.name,
            id=run_id,
            resume="allow",
            dir=str(run_path),
            config=config,
            reinit="create_new",
        )

    def log(self, row: Mapping[str, object]) -> None:
        step = int(row.get("step", 0))  # type: ignore[call-overload]
        self.run.log(numeric(row), step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, Callable[[Path], Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


class Trackers:
    """Several trackers as one."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, row: Mapping[str, object]) -> None:
        for tracker in self.trackers:
            tracker.log(row)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def open_tracker(report_to: str, run_path: Path) -> Tracker:
    """The trackers named in `report_to` (a comma list of TRACKERS keys) for one run directory."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"config key 'report_to': unknown tracker {unknown[0]!r}; choose from {sorted(TRACKERS)}")
    trackers = []
    for name in names:
        try:
            trackers.append(TRACKERS[name](run_path))
        except ImportError as e:
            raise ImportError(f"report_to={name} needs its package: pip install -e '.[track]' ({e})") from e
    return Trackers(trackers)
