"""A run directory and its lifecycle: `config.json`, `metrics.jsonl`, `checkpoints/`, claim, done.

Nothing is lost on a crash:

- `metrics.jsonl` gets one JSON object per step, flushed and fsynced before the step's checkpoint.
- A checkpoint is written to a temporary folder and renamed into place, then `checkpoints/latest`
  is replaced atomically: a reader sees the old checkpoint or the new one, never half of one.
- On resume, metrics rows from steps after the checkpoint (written before a crash) and any torn
  last line are dropped, so every step appears exactly once however the run was killed.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from rlora.config import TrainConfig, from_dict, read_config, save_config, to_dict
from rlora.tracking import Tracker, open_tracker

LATEST = "latest"
DONE_FILE = "done.json"  # a finished run: every later sweep or launch skips it


class RunFileError(ValueError):
    """A run directory's file is missing or unreadable; the message names the file."""


ERROR_FILE = "error.txt"  # a failed run's traceback (or a launcher's log tail)
LOCK_FILE = ".lock"  # the flock of whoever trains the run now
C = TypeVar("C", bound=TrainConfig)


class RunDir:
    def __init__(self, path: str | Path, report_to: str = "") -> None:
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self.config_path = self.path / "config.json"
        self.ckpt_root = self.path / "checkpoints"
        self.report_to = report_to  # trackers that get every row too (rlora.tracking), opened at the first row
        self._tracker: Tracker | None = None

    # ---------------------------------------------------------------- lifecycle

    def status(self) -> str:
        """'done', 'partial' (a config but no done marker: resume it) or 'new'."""
        if (self.path / DONE_FILE).exists():
            return "done"
        if self.config_path.exists():
            return "partial"
        return "new"

    @contextmanager
    def claim(self) -> Iterator[bool]:
        """Hold an exclusive flock on the run while training it; yields False if someone else holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the lock

    def mark_done(self, wall_s: float, resumed: bool) -> None:
        """The done marker that makes every later sweep or launch skip the run; a stale error goes."""
        (self.path / ERROR_FILE).unlink(missing_ok=True)
        done = {"wall_s": wall_s, "resumed": resumed, "time": time.time()}
        (self.path / DONE_FILE).write_text(json.dumps(done) + "\n")

    def record(self, info: dict[str, object]) -> None:
        """Merge `info` into `run.json`: what scored and ran the run beyond its config (e.g. the reward policy's version)."""
        path = self.path / "run.json"
        merged = {**(json.loads(path.read_text()) if path.exists() else {}), **info}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
        os.replace(tmp, path)

    def set_config_key(self, key: str, value: object) -> None:
        """Change one key of the saved config (a sweep moving a run to another device)."""
        saved = json.loads(self.config_path.read_text())
        saved[key] = value
        self.config_path.write_text(json.dumps(saved, indent=2) + "\n")

    # ---------------------------------------------------------------- metrics

    def log(self, row: dict[str, object]) -> None:
        """Append one row to metrics.jsonl (the source of truth, fsynced), then to the trackers."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.report_to:
            if self._tracker is None:
                self._tracker = open_tracker(self.report_to, self.path)
            self._tracker.log(row)

    def close(self) -> None:
        """Flush and close the trackers (metrics.jsonl needs nothing: every row is already on disk)."""
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_tracker": None}  # rank 0 broadcasts the RunDir; trackers stay there

    def read_metrics(self, strict: bool = False) -> list[dict[str, object]]:
        """The metrics rows, up to a torn line (a kill mid-write; resume drops it).

        `strict` (analysis): only a torn LAST line of an unfinished run is forgiven; any other bad
        row, a row without a 'step', or a finished run (`done.json`) without metrics raises
        RunFileError naming the file and line, since an analysis would silently lose that run."""
        path, finished = self.metrics_path, strict and (self.path / DONE_FILE).exists()
        if not path.exists():
            if finished:
                raise RunFileError(f"{path}: missing, but the run is marked done ({self.path / DONE_FILE})")
            return []
        lines = path.read_text().splitlines()
        rows: list[dict[str, object]] = []
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if not strict or (i == len(lines) and not finished):
                    break
                raise RunFileError(f"{path}:{i}: not a JSON row ({e})") from e
            if strict and (not isinstance(row, dict) or "step" not in row):
                raise RunFileError(f"{path}:{i}: a metrics row must be a JSON object with a 'step', got {line[:80]!r}")
            rows.append(row)
        return rows

    def truncate_metrics(self, next_step: int) -> None:
        """Keep only rows of steps before `next_step` (atomically rewritten)."""
        rows = [r for r in self.read_metrics() if int(r["step"]) < next_step]  # type: ignore[call-overload]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.metrics_path)

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(
        self,
        next_step: int,
        learner_state: dict[str, object],
        extra_files: dict[str, Callable[[Path], None]] | None = None,
        keep: int = 1,
        snapshot_dtype: str = "",
    ) -> Path:
        """Everything needed to continue at `next_step`: trainable weights, optimizer, RNG.

        The last `keep` checkpoints stay full states. Older ones keep their policy for evaluation
        at that step (`trainable.pt`, cast to `snapshot_dtype`, the engine's dtype, when given;
        and `adapter/` for LoRA) but lose the optimizer and RNG state, which only resuming needs:
        an 8B FullFT run then stores 16 GB per evaluation snapshot, not 96 GB per checkpoint.
        """
        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        final = self.ckpt_root / f"step_{next_step:06d}"
        tmp = self.ckpt_root / f".tmp_step_{next_step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(learner_state["trainable"], tmp / "trainable.pt")
        torch.save(learner_state["optimizer"], tmp / "optimizer.pt")
        for name, save in (extra_files or {}).items():
            save(tmp / name)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"next_step": next_step, "time": time.time()}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = self.ckpt_root / (LATEST + ".tmp")
        pointer.write_text(final.name)
        os.replace(pointer, self.ckpt_root / LATEST)
        full = sorted(p for p in self.ckpt_root.glob("step_*") if (p / "optimizer.pt").exists())
        for old in full[: -max(keep, 1)]:
            demote_checkpoint(old, snapshot_dtype)
        return final

    def checkpoint_at(self, step: int) -> Path:
        """The checkpoint written after `step` steps (its policy is the one after that many updates)."""
        path = self.ckpt_root / f"step_{step:06d}"
        if not (path / "trainable.pt").exists():
            have = sorted(int(p.name[5:]) for p in self.ckpt_root.glob("step_*")) if self.ckpt_root.exists() else []
            raise FileNotFoundError(f"{self.path} has no checkpoint at step {step}; it has steps {have}")
        return path

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_root / LATEST
        if not pointer.exists():
            return None
        path = self.ckpt_root / pointer.read_text().strip()
        if not (path / "state.json").exists():
            raise FileNotFoundError(f"checkpoint pointer {pointer} names {path}, which is incomplete or missing")
        return path

    @staticmethod
    def load_checkpoint(path: Path) -> tuple[int, dict[str, object]]:
        next_step = int(json.loads((path / "state.json").read_text())["next_step"])
        # mmap: tensors stay in the file until read; a sharded learner copies only its own slices
        # (torch's set_model_state_dict slices the full tensors), so no rank reads the whole state
        learner_state = {
            "trainable": torch.load(path / "trainable.pt", weights_only=False, mmap=True),
            "optimizer": torch.load(path / "optimizer.pt", weights_only=False, mmap=True),
        }
        rng = torch.load(path / "rng.pt", weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        return next_step, learner_state


def demote_checkpoint(path: Path, snapshot_dtype: str = "") -> None:
    """A full checkpoint becomes an evaluation snapshot: no optimizer or RNG state, floating weights in `snapshot_dtype`."""
    for name in ("optimizer.pt", "rng.pt"):
        (path / name).unlink(missing_ok=True)
    if not snapshot_dtype or snapshot_dtype == "float32":
        return
    dtype = getattr(torch, snapshot_dtype)
    weights = torch.load(path / "trainable.pt", weights_only=True, mmap=True)
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    tmp = path / "trainable.pt.tmp"
    torch.save(cast, tmp)
    os.replace(tmp, path / "trainable.pt")


def create_run(cfg: C, name: str, command: str) -> RunDir:
    """A new run directory (cfg.run_dir, or runs/<name>-<time>) holding the resolved config."""
    run_dir = cfg.run_dir
    path = Path(run_dir) if run_dir else Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    run = RunDir(path, cfg.report_to)
    if run.config_path.exists():
        raise FileExistsError(f"run dir {path} already holds a run; resume it with `rlora {command} --resume {path}`")
    path.mkdir(parents=True, exist_ok=True)
    save_config(replace(cfg, run_dir=str(path)), run.config_path)
    return run


def reopen_run(cls: type[C], run_dir: str | Path, overrides: dict[str, object] | None = None) -> tuple[C, RunDir]:
    """An existing run's config (with overrides applied and saved) and its directory."""
    run = RunDir(run_dir)
    if not run.config_path.exists():
        raise FileNotFoundError(f"{run.config_path} does not exist: not a run directory")
    cfg = read_config(cls, run.config_path)
    if overrides:
        cfg = from_dict(cls, {**to_dict(cfg), **overrides}, where=" (resume override)")
        save_config(cfg, run.config_path)
    run.report_to = cfg.report_to
    return cfg, run
