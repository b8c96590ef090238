"""Sweeps: a grid over config fields, one run directory per point, resumable at any moment.

A sweep file is YAML (the one nested format in rlora; each run's own config stays flat):

    kind: sft                       # sft | rl: which entry point every point runs
    base: configs/sft_cpu.yaml      # optional flat preset (relative to the cwd, else to this file)
    out: runs/sweep_sft_cpu         # optional; default runs/<sweep file stem>
    devices: [cpu]                  # optional; several devices = one worker process per device
    fixed: {max_steps: 30}          # optional: the same override for every point
    grid:                           # key: [values]; the points are the product of the lists
      rank: [1, 4, 16, 64, full]
      lr: [1.0e-4, 3.0e-4, 1.0e-3]
      alpha_rule: [constant, per_rank, sqrt]

`grid` may also be a list of such mappings: the points are then the union of their products,
e.g. to give each alpha rule its own learning-rate range. Every key is a config field of `kind`
and every point is checked like a command line, so a typo fails before anything runs.

A study adds seeds at each arm's best learning rate, a second phase that only exists once the
first has run:

    seeds_at_best_lr:
      seeds: [1, 2]                   # more runs of each arm at its best grid lr, one per seed
      arms: {alpha_rule: [constant]}  # optional: only these arms (FullFT ignores LoRA-only keys)

An arm is a grid point without its `lr` and `seed`. Once every grid run of an arm is done, its
best grid lr (rlora.experiments.analyze: the sweep's final metric, seeds averaged) gets one run
per listed seed (`rlora.experiments.study.add_seed_points`); `rlora sweep` runs the grid, then
those, and a later invocation (days later) adds the arms whose grid has finished since. Only the
grid's own runs choose the lr, so the seeds never move it.

FullFT points: a point with rank=full drops the LoRA-only keys (`LORA_KEYS`, e.g. alpha_rule),
which mean nothing without an adapter, so the grid above has one FullFT run per lr, not three.

Names and resume: a run is named from its grid values in grid order, `rank=4,lr=0.001,alpha_rule=sqrt`,
and lives in `<out>/<name>/`. Running a sweep again skips finished runs (`done.json`), resumes
half-finished ones from their last checkpoint (or from step 0 when the kind keeps none), and
starts the rest. A run directory whose `config.json` disagrees with the sweep file is an error,
never silently mixed. Each run is claimed by an flock on `<run>/.lock`: workers on several
devices take the next unclaimed run from the same list, and a second sweep started by mistake
skips what the first is training. A run that raises is recorded in `<run>/error.txt`, the sweep
goes on, and the command exits non-zero at the end; running it again retries that run.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from rlora.config import ConfigError, TrainConfig, from_dict, load_yaml, to_dict
from rlora.runs import ERROR_FILE, RunDir

# Keys that only mean something with an adapter; a FullFT point drops them.
LORA_KEYS = ("alpha_rule", "alpha_c", "lora_init", "lora_init_scale", "lora_targets", "lr_b_mult")
# Keys that may differ between a run's saved config and the sweep's without making it another run.
IGNORED_ON_RESUME = ("run_dir", "device", "report_to")
SWEEP_FILE = "sweep.json"
SPEC_KEYS = ("kind", "base", "out", "devices", "fixed", "grid", "seeds_at_best_lr")
SEED_PHASE_KEYS = ("seeds", "arms")


# ------------------------------------------------------------------------------------ kinds


def _start_sft(cfg: TrainConfig, name: str, progress: bool) -> RunDir:
    from rlora.sft.loop import SFTConfig, run_sft

    assert isinstance(cfg, SFTConfig)
    return run_sft(cfg, name, progress)


def _resume_sft(path: Path, progress: bool) -> RunDir:
    from rlora.sft.loop import resume_sft

    return resume_sft(path, progress=progress)


def _start_rl(cfg: TrainConfig, name: str, progress: bool) -> RunDir:
    from rlora.config import RLConfig
    from rlora.rl.loop import run_rl

    assert isinstance(cfg, RLConfig)
    return run_rl(cfg, name, progress)


def _resume_rl(path: Path, progress: bool) -> RunDir:
    from rlora.rl.loop import resume_rl

    return resume_rl(path, progress=progress)


def _sft_config() -> type[TrainConfig]:
    from rlora.sft.loop import SFTConfig

    return SFTConfig


def _rl_config() -> type[TrainConfig]:
    from rlora.config import RLConfig

    return RLConfig


@dataclass(frozen=True)
class Kind:
    """An entry point a sweep can run: its config class and how to start and resume one run."""

    config_cls: Callable[[], type[TrainConfig]]
    start: Callable[[TrainConfig, str, bool], RunDir]
    resume: Callable[[Path, bool], RunDir]


KINDS: dict[str, Kind] = {
    "sft": Kind(_sft_config, _start_sft, _resume_sft),
    "rl": Kind(_rl_config, _start_rl, _resume_rl),
}


# ------------------------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class Point:
    """One run of a sweep."""

    name: str  # from its grid values: "rank=4,lr=0.001,alpha_rule=sqrt"
    overrides: tuple[tuple[str, object], ...]  # its grid values, in grid order, as the config reads them
    config: TrainConfig  # the full config (base + fixed + overrides), run_dir = <out>/<name>


@dataclass(frozen=True)
class SeedPhase:
    """`seeds_at_best_lr`: once an arm's lr grid is done, one more run per seed at its best grid lr."""

    seeds: tuple[int, ...]
    arms: tuple[tuple[str, tuple[str, ...]], ...]  # (config key, allowed values as run names print them); () = every arm

    def selects(self, point: Point) -> bool:
        """Whether the point's arm gets seeds: each listed key's value is allowed (FullFT skips LoRA-only keys)."""
        for key, allowed in self.arms:
            if point.config.rank == "full" and key in LORA_KEYS:
                continue
            if format_value(getattr(point.config, key)) not in allowed:
                return False
        return True


@dataclass(frozen=True)
class Sweep:
    kind: str
    path: Path  # the sweep file
    out: Path  # where the run directories go
    devices: tuple[str, ...]  # () = each config's own `device`
    points: tuple[Point, ...]  # the grid's points (plus, once expanded, the seed phase's)
    seed_phase: SeedPhase | None = None


def format_value(value: object) -> str:
    """How a value appears in a run name: floats short (0.001, 3e-05), everything else as str."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run_name(overrides: tuple[tuple[str, object], ...]) -> str:
    name = ",".join(f"{k}={format_value(v)}" for k, v in overrides) or "base"
    return name.replace("/", "_").replace(" ", "")


def expand_grid(grid: dict[str, list[object]] | list[dict[str, list[object]]], where: str = "") -> list[dict[str, object]]:
    """The points of a grid (or the union of a list of grids), in order, before any config check."""
    grids = grid if isinstance(grid, list) else [grid]
    if not grids:
        raise ConfigError(f"sweep grid{where} is empty")
    points: list[dict[str, object]] = []
    for g in grids:
        if not isinstance(g, dict) or not g:
            raise ConfigError(f"sweep grid{where} must be a mapping key: [values] (or a list of them), got {g!r}")
        for key, values in g.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep grid key {key!r}{where} must be a non-empty list, got {values!r}")
        keys = list(g)
        points.extend(dict(zip(keys, combo)) for combo in itertools.product(*(g[k] for k in keys)))
    return points


def make_points(kind: str, base: dict[str, object], raw_points: list[dict[str, object]], out: Path, where: str = "") -> tuple[Point, ...]:
    """Check each point as a config, drop LoRA keys from FullFT points, name them, remove duplicates."""
    cls = KINDS[kind].config_cls()
    known = {f.name for f in fields(cls)}
    seen: dict[str, Point] = {}
    for raw in raw_points:
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r} in the grid{where}; known keys: {', '.join(sorted(known))}")
        cfg = from_dict(cls, {**base, **raw}, where=f" (sweep point {raw}){where}")
        if cfg.rank == "full":
            raw = {k: v for k, v in raw.items() if k not in LORA_KEYS}
            cfg = from_dict(cls, {**base, **raw}, where=f" (sweep point {raw}){where}")
        overrides = tuple((k, getattr(cfg, k)) for k in raw)
        name = run_name(overrides)
        if name in seen:
            continue
        cfg = from_dict(cls, {**to_dict(cfg), "run_dir": str(out / name)})
        seen[name] = Point(name, overrides, cfg)
    return tuple(seen.values())


def arm_key(point: Point) -> tuple[tuple[str, object], ...]:
    """A point's arm: its grid values without `lr` and `seed` (FullFT's already lack the LoRA-only keys)."""
    return tuple((k, v) for k, v in point.overrides if k not in ("lr", "seed"))


def seed_point(point: Point, lr: float, seed: int, out: Path) -> Point:
    """`point`'s arm at `lr` with `seed`: the name keeps the grid order, a seed not in the grid goes last."""
    overrides = dict(point.overrides)
    overrides["lr"] = lr
    overrides["seed"] = seed
    items = tuple(overrides.items())
    name = run_name(items)
    cfg = from_dict(type(point.config), {**to_dict(point.config), "lr": lr, "seed": seed, "run_dir": str(out / name)})
    return Point(name, items, cfg)


def parse_seed_phase(spec: object, cls: type[TrainConfig], where: str) -> SeedPhase:
    if not isinstance(spec, dict) or set(spec) - set(SEED_PHASE_KEYS) or "seeds" not in spec:
        raise ConfigError(f"sweep key 'seeds_at_best_lr'{where} must be a mapping with 'seeds' (a list of ints) and optional 'arms', got {spec!r}")
    seeds = spec["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise ConfigError(f"seeds_at_best_lr 'seeds'{where} must be a non-empty list of ints, got {seeds!r}")
    arms = spec.get("arms") or {}
    if not isinstance(arms, dict):
        raise ConfigError(f"seeds_at_best_lr 'arms'{where} must be a mapping key: [values], got {arms!r}")
    known = {f.name for f in fields(cls)}
    for key, values in arms.items():
        if key not in known or key in ("lr", "seed"):
            raise ConfigError(f"seeds_at_best_lr 'arms' key {key!r}{where} must be a config key other than lr and seed")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"seeds_at_best_lr 'arms' key {key!r}{where} must be a non-empty list, got {values!r}")
    return SeedPhase(tuple(seeds), tuple((k, tuple(format_value(v) for v in vs)) for k, vs in arms.items()))


def _resolve(path_text: str, sweep_path: Path) -> Path:
    path = Path(path_text)
    if path.is_absolute() or path.exists():
        return path
    return sweep_path.parent / path


def load_sweep(path: str | Path, out: str | Path | None = None) -> Sweep:
    """Read and check a sweep file; every point is built as a config (errors name the key and file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    return parse_sweep(yaml.safe_load(path.read_text()) or {}, path, out)


def parse_sweep(spec: object, path: Path, out: str | Path | None = None) -> Sweep:
    """A sweep from the mapping read out of `path` (`rlora.experiments.launch` reads plan files this way, its own keys removed)."""
    where = f" in {path}"
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {path} must be a mapping with keys {SPEC_KEYS}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"unknown sweep key {unknown[0]!r}{where}; known: {', '.join(SPEC_KEYS)}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"sweep key 'kind'{where} must be one of {sorted(KINDS)}, got {kind!r}")
    base: dict[str, object] = {}
    if spec.get("base"):
        base_path = _resolve(str(spec["base"]), path)
        base.update(load_yaml(base_path))
        from_dict(KINDS[kind].config_cls(), base, where=f" in {base_path}")
    fixed = spec.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"sweep key 'fixed'{where} must be a mapping of config keys, got {fixed!r}")
    base.update(fixed)
    devices = spec.get("devices") or []
    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",")]
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise ConfigError(f"sweep key 'devices'{where} must be a list of device names, got {devices!r}")
    out_path = Path(out) if out else Path(str(spec.get("out") or Path("runs") / path.stem))
    if "grid" not in spec:
        raise ConfigError(f"sweep file {path} has no 'grid'")
    points = make_points(kind, base, expand_grid(spec["grid"], where), out_path, where)
    phase = parse_seed_phase(spec["seeds_at_best_lr"], KINDS[kind].config_cls(), where) if "seeds_at_best_lr" in spec else None
    return Sweep(kind, path, out_path, tuple(devices), points, phase)


# ------------------------------------------------------------------------------------ running


def check_same_config(point: Point, run_dir: Path) -> None:
    saved = json.loads((run_dir / "config.json").read_text())
    wanted = to_dict(point.config)
    for key in sorted(set(saved) | set(wanted)):
        if key in IGNORED_ON_RESUME:
            continue
        if key == "dtype" and "auto" in (saved.get(key), wanted.get(key)):
            continue  # a run saves the dtype `auto` chose where it started, and keeps it on any machine
        if saved.get(key) != wanted.get(key):
            raise ConfigError(
                f"run {run_dir} has {key}={saved.get(key)!r} but the sweep now says {key}={wanted.get(key)!r}; restore the sweep file or move that run away"
            )


def write_sweep_record(sweep: Sweep) -> None:
    """`<out>/sweep.json`: what the analysis needs to know without the sweep file (kind, points)."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    record = {
        "kind": sweep.kind,
        "sweep_file": str(sweep.path),
        "grid_keys": sorted({k for p in sweep.points for k, _ in p.overrides}),
        "runs": [p.name for p in sweep.points],
    }
    tmp = sweep.out / (SWEEP_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, sweep.out / SWEEP_FILE)
    (sweep.out / "sweep.yaml").write_text(sweep.path.read_text())


def run_point(kind: Kind, point: Point, device: str | None, progress: bool) -> str:
    """Train (or resume) one point; returns 'done', 'skipped' (finished or held elsewhere) or 'failed'."""
    run_dir = Path(str(point.config.run_dir))
    if RunDir(run_dir).status() == "done":
        check_same_config(point, run_dir)  # a finished run of another config must not pass for this one
        return "skipped"
    with RunDir(run_dir).claim() as mine:
        if not mine:
            return "skipped"
        status = RunDir(run_dir).status()  # again, under the lock: another worker may have just finished it
        if status == "done":
            return "skipped"
        start = time.time()
        try:
            if status == "partial":
                check_same_config(point, run_dir)
                if device is not None:
                    RunDir(run_dir).set_config_key("device", device)
                kind.resume(run_dir, progress)
            else:
                cfg = point.config
                if device is not None:
                    cfg = from_dict(type(cfg), {**to_dict(cfg), "device": device})
                kind.start(cfg, point.name, progress)
        except ConfigError:
            raise  # a broken sweep file: stop everything, it will fail the same way for every point
        except Exception:  # one bad point (diverged to an exception, out of memory): record it, go on
            (run_dir / ERROR_FILE).write_text(traceback.format_exc())
            return "failed"
        RunDir(run_dir).mark_done(time.time() - start, resumed=status == "partial")
        return "done"


def run_worker(
    sweep: Sweep, device: str | None = None, progress: bool = False, log: Callable[[str], None] = print, budget_s: float = 0.0
) -> dict[str, list[str]]:
    """Go through every point in order, training those not finished and not claimed by another worker.

    With `budget_s` > 0 no new run starts once that many seconds have passed, though every call
    trains at least one (the sweep is then continued by running it again): how a long sweep is
    run in chunks on a shared machine.
    """
    kind = KINDS[sweep.kind]
    outcome: dict[str, list[str]] = {"done": [], "skipped": [], "failed": [], "left": []}
    n = len(sweep.points)
    t0 = time.time()
    for i, point in enumerate(sweep.points, 1):
        start = time.time()
        if budget_s and (outcome["done"] or outcome["failed"]) and start - t0 > budget_s:  # at least one run per call
            if RunDir(sweep.out / point.name).status() != "done":
                outcome["left"].append(point.name)
            continue
        result = run_point(kind, point, device, progress)
        outcome[result].append(point.name)
        if result != "skipped":
            where = f" on {device}" if device else ""
            log(f"[{i}/{n}] {point.name}: {result} in {time.time() - start:.0f} s{where}")
    return outcome


def run_sweep(sweep: Sweep, progress: bool = False, log: Callable[[str], None] = print, budget_s: float = 0.0) -> dict[str, list[str]]:
    """Run every point: in this process for one device, else one worker process per device."""
    write_sweep_record(sweep)
    if len(sweep.devices) <= 1:
        return run_worker(sweep, sweep.devices[0] if sweep.devices else None, progress, log, budget_s)
    budget = ["--budget-s", str(budget_s)] if budget_s else []
    workers = [
        subprocess.Popen([sys.executable, "-m", "rlora.cli", "sweep", "--config", str(sweep.path), "--out", str(sweep.out), "--device", device, *budget])
        for device in sweep.devices
    ]
    codes = [w.wait() for w in workers]
    outcome: dict[str, list[str]] = {"done": [], "skipped": [], "failed": [], "left": []}
    for point in sweep.points:
        run_dir = sweep.out / point.name
        status = "done" if RunDir(run_dir).status() == "done" else "failed" if (run_dir / ERROR_FILE).exists() else "left"
        outcome[status].append(point.name)
    if any(codes) and not outcome["failed"]:
        raise RuntimeError(f"sweep workers exited with codes {codes}")
    return outcome
