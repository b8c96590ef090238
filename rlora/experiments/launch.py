"""`rlora launch`: a plan of runs placed on one node's GPUs, one child process per run.

A plan file is a sweep file (`rlora.experiments.sweep`: kind, base, out, fixed, grid or a list of grids; the
same run names, run directories and resume rules) plus what each run needs from the node:

    gpus_per_run: {lora: 1, full: 4}  # or one integer for every run; a rank key (32: 2) overrides lora
    share: 1                          # 1-GPU runs per GPU (small models); default 1

Placement policy (`assign`; `place` is its dry run):
  1. Largest first: waiting runs are taken in order of GPUs needed, descending, ties in plan
     order. Big blocks are the hardest to find later, and the FullFT runs are the long pole.
  2. A multi-GPU run gets a block of wholly free GPUs that are neighbours in the `--gpus` list
     (neighbouring ids share a PCIe switch and NUMA node on most 8-GPU boxes; on NVSwitch nodes
     every pair is equal). Best fit: the smallest free stretch that holds it, the lowest first,
     so long stretches stay whole for the next big run.
  3. A 1-GPU run first fills a GPU that already runs fewer than `share` runs (packing), else it
     takes the first GPU of the smallest free stretch.
  4. A run starts as soon as GPUs for it are free; until then it waits. Smaller runs may start
     on GPUs a waiting bigger run cannot use yet (backfill, no reservations).
  5. Runs never share a GPU unless `share` > 1, and a multi-GPU run never shares.
  6. A run that needs more GPUs than the node has is an error, naming it, before anything starts.
The dry run (`place`) applies the same policy in waves, as if every run took equally long.

Execution: each run is a child process, `python -m rlora.cli <kind> key=value ...` (or
`--resume RUN_DIR` for a half-finished run), under `torch.distributed.run --standalone
--nproc_per_node N` (torchrun) when it has N > 1 GPUs, with `CUDA_VISIBLE_DEVICES` set to its
GPUs and stdout and stderr appended to `<run_dir>/launch.log`. The key=value list is every field
that differs from the config's defaults, so the command rebuilds the planned config exactly.
Finished runs (`done.json`, or metrics and checkpoint complete) are skipped; a run directory
whose config disagrees with the plan is an error, as in a sweep. A run is claimed with the
sweep's flock, so a second launcher (or sweep) skips it. A child that exits non-zero leaves
`<run_dir>/error.txt` (its exit code and the end of its log); the others go on and the launcher
exits non-zero at the end. `--cpu-slots N` stands N CPU workers in for GPUs (device=cpu, no CUDA
device visible): how the launcher is tested on a machine without GPUs.

Multi-node is out of scope on purpose: a run larger than a node goes through the existing
launchers (torchrun or accelerate with --nnodes, Ray for vLLM's multi-node engines), never a
scheduler of our own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import yaml

from rlora.config import ConfigError, TrainConfig, from_dict, parse_overrides, to_dict
from rlora.experiments.sweep import (
    SPEC_KEYS,
    Point,
    Sweep,
    check_same_config,
    parse_sweep,
    write_sweep_record,
)
from rlora.runs import DONE_FILE, ERROR_FILE, LATEST, RunDir

LAUNCH_KEYS = ("gpus_per_run", "share")
LOG_FILE = "launch.log"
POLL_S = 0.5
LOG_TAIL_LINES = 40
# The metric shown as "last" in the status table, by kind: the newest value of the first key any row has.
LAST_KEYS = {"rl": ("reward_mean",), "sft": ("eval_loss", "train_loss")}


# ------------------------------------------------------------------------------------ the node


def parse_gpus(spec: str) -> tuple[int, ...]:
    """`0-7`, `0,2,5` or `0-3,6`: device ids in the order given (the order placement calls neighbours)."""
    ids: list[int] = []
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ValueError(f"--gpus {spec!r}: {part.strip()!r} is not a GPU id or a range like 0-7") from None
        if first < 0 or last < first:
            raise ValueError(f"--gpus {spec!r}: {part.strip()!r} is not an increasing range of ids >= 0")
        ids.extend(range(first, last + 1))
    duplicates = sorted({g for g in ids if ids.count(g) > 1})
    if duplicates:
        raise ValueError(f"--gpus {spec!r} names GPU {duplicates[0]} twice")
    return tuple(ids)


@dataclass(frozen=True)
class Node:
    """What runs are placed on."""

    gpus: tuple[int, ...]  # device ids, neighbours in locality order (--gpus), or CPU slot numbers
    share: int = 1  # how many 1-GPU runs may share one GPU
    cpu: bool = False  # the ids are CPU slots: runs get device=cpu and see no CUDA device


def make_node(gpus: str | None, cpu_slots: int, share: int = 1) -> Node:
    """The node of `--gpus SPEC` or `--cpu-slots N` (exactly one of them)."""
    if bool(gpus) == bool(cpu_slots):
        raise ValueError("give --gpus (e.g. 0-7 or 0,2,5) or --cpu-slots N, not both or neither")
    if gpus:
        return Node(parse_gpus(gpus), share)
    if cpu_slots < 1:
        raise ValueError(f"--cpu-slots must be >= 1, got {cpu_slots}")
    return Node(tuple(range(cpu_slots)), share, cpu=True)


@dataclass(frozen=True)
class Run:
    """What placement knows of a run."""

    name: str
    gpus: int  # how many GPUs it needs


@dataclass(frozen=True)
class Assignment:
    """Where the dry run puts one run: its GPUs and its wave."""

    run: Run
    gpus: tuple[int, ...]
    wave: int  # in the dry run: wave k starts when wave k-1 has ended (equal run times assumed)


# ------------------------------------------------------------------------------------ placement (pure)


def check_fits(runs: Sequence[Run], node: Node) -> None:
    for run in runs:
        if not 1 <= run.gpus <= len(node.gpus):
            raise ValueError(f"run {run.name!r} needs {run.gpus} GPUs but the node has {len(node.gpus)} ({_ids(node.gpus)})")


def cost(run: Run, node: Node) -> int:
    """Load a run puts on each of its GPUs: one share, or the whole GPU for a multi-GPU run."""
    return 1 if run.gpus == 1 else node.share


def free_stretches(load: Mapping[int, int], node: Node) -> list[tuple[int, ...]]:
    """Maximal stretches of idle GPUs that are neighbours in the node's order."""
    stretches: list[tuple[int, ...]] = []
    current: list[int] = []
    for g in node.gpus:
        if load[g] == 0:
            current.append(g)
            continue
        if current:
            stretches.append(tuple(current))
        current = []
    if current:
        stretches.append(tuple(current))
    return stretches


def pick(n: int, load: Mapping[int, int], node: Node) -> tuple[int, ...] | None:
    """The GPUs for a run of n GPUs under the policy (rules 2, 3, 5), or None if none are free."""
    if n == 1:
        shared = [g for g in node.gpus if 0 < load[g] < node.share]
        if shared:
            return (max(shared, key=lambda g: load[g]),)  # the fullest first: keeps idle GPUs whole
    fits = [s for s in free_stretches(load, node) if len(s) >= n]
    if not fits:
        return None
    return min(fits, key=len)[:n]  # min keeps the first of equals: the lowest stretch


def assign(waiting: Sequence[Run], load: Mapping[int, int], node: Node) -> list[tuple[Run, tuple[int, ...]]]:
    """Which waiting runs start now, on which GPUs, given the runs on each GPU (`load`)."""
    load = dict(load)
    started: list[tuple[Run, tuple[int, ...]]] = []
    for run in sorted(waiting, key=lambda r: -r.gpus):  # sorted is stable: ties keep plan order
        gpus = pick(run.gpus, load, node)
        if gpus is None:
            continue
        for g in gpus:
            load[g] += cost(run, node)
        started.append((run, gpus))
    return started


def place(runs: Sequence[Run], node: Node) -> tuple[Assignment, ...]:
    """The dry run: `assign` on an idle node, wave after wave, until every run has GPUs."""
    check_fits(runs, node)
    waiting = list(runs)
    placements: list[Assignment] = []
    wave = 0
    while waiting:
        started = assign(waiting, {g: 0 for g in node.gpus}, node)
        assert started, "an idle node must start some run (check_fits passed)"
        for run, gpus in started:
            placements.append(Assignment(run, gpus, wave))
            waiting.remove(run)
        wave += 1
    return tuple(placements)


# ------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Plan:
    sweep: Sweep  # kind, points (run names, configs with run_dir), out
    runs: tuple[Run, ...]  # one per point, in the same order
    share: int


def gpus_table(value: object, where: str) -> dict[object, int]:
    """`gpus_per_run` as {"lora": n, "full": n, rank: n}; one integer means every run."""
    table = {"lora": value, "full": value} if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(table, dict):
        raise ConfigError(f"plan key 'gpus_per_run'{where} must be an integer or a mapping like {{lora: 1, full: 4}}, got {value!r}")
    for key, n in table.items():
        if key not in ("lora", "full") and (isinstance(key, bool) or not isinstance(key, int)):
            raise ConfigError(f"plan key 'gpus_per_run'{where}: {key!r} is not lora, full or a LoRA rank")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"plan key 'gpus_per_run'{where}: {key}: must be an integer >= 1, got {n!r}")
    return table


def gpus_needed(cfg: TrainConfig, table: Mapping[object, int]) -> int:
    rank = cfg.rank
    if rank == "full":
        return table.get("full", 1)
    return table.get(rank, table.get("lora", 1))


def load_plan(path: str | Path, out: str | Path | None = None) -> Plan:
    """Read a plan file: a sweep (checked by `rlora.experiments.sweep`) plus `gpus_per_run` and `share`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"plan file {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    where = f" in {path}"
    # the GPUs come from --gpus; a study's seed phase needs `rlora sweep`, which adds it once the grid is done
    known = tuple(k for k in SPEC_KEYS if k not in ("devices", "seeds_at_best_lr")) + LAUNCH_KEYS
    unknown = sorted(set(spec) - set(known)) if isinstance(spec, dict) else []
    if unknown:
        raise ConfigError(f"unknown plan key {unknown[0]!r}{where}; known: {', '.join(known)}")
    launch_keys = {k: spec.pop(k) for k in LAUNCH_KEYS if k in spec} if isinstance(spec, dict) else {}
    sweep = parse_sweep(spec, path, out)
    table = gpus_table(launch_keys.get("gpus_per_run", 1), where)
    share = launch_keys.get("share", 1)
    if isinstance(share, bool) or not isinstance(share, int) or share < 1:
        raise ConfigError(f"plan key 'share'{where} must be an integer >= 1, got {share!r}")
    return Plan(sweep, tuple(Run(p.name, gpus_needed(p.config, table)) for p in sweep.points), share)


# ------------------------------------------------------------------------------------ commands


@dataclass(frozen=True)
class Command:
    """One child process: its argv and the variables set on top of the launcher's environment."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]

    def shell(self) -> str:
        """As one would type it (the launcher's own interpreter written `python`)."""
        argv = ["python" if a == sys.executable else a for a in self.argv]
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env), shlex.join(argv)])


def format_override(value: object) -> str:
    """A value as `key=value` reads it back (YAML scalars): strings quoted only when YAML would change them."""
    if isinstance(value, str) and value and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)  # JSON scalars are YAML scalars: "", "1", true, null, 5e-06


def config_args(cfg: TrainConfig) -> list[str]:
    """`key=value` for every field that differs from the config class's defaults: rebuilds exactly cfg."""
    defaults = to_dict(type(cfg)())
    args = [f"{k}={format_override(v)}" for k, v in to_dict(cfg).items() if v != defaults[k]]
    rebuilt = from_dict(type(cfg), parse_overrides(args))
    assert rebuilt == cfg, f"the command line would not rebuild the planned config: {args}"
    return args


def command_for(kind: str, point: Point, gpus: tuple[int, ...], node: Node, resume: bool) -> Command:
    """The child process of one run on `gpus`: plain for one GPU, torchrun for several."""
    cfg = dataclasses.replace(point.config, device="cpu") if node.cpu else point.config
    if resume:  # the run dir's config.json is the config; only the device may change (as in a sweep)
        args = ["--resume", str(cfg.run_dir), *(["device=cpu"] if node.cpu else [])]
    else:
        args = config_args(cfg)
    entry = ["-m", "rlora.cli", kind, *args]
    if len(gpus) > 1:  # data parallel learner, one process per GPU
        entry = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(gpus)}", *entry]
    visible = "" if node.cpu else ",".join(map(str, gpus))
    return Command((sys.executable, *entry), (("CUDA_VISIBLE_DEVICES", visible), ("PYTHONUNBUFFERED", "1")))


# ------------------------------------------------------------------------------------ run state on disk


def final_step(kind: str, cfg: TrainConfig) -> int:
    """The step of the last metrics row a finished run writes."""
    if kind == "sft":
        return int(cfg.max_steps)  # the final held-out loss row
    return int(cfg.max_steps) - (0 if cfg.eval_every else 1)  # rl: + a final eval row


def is_finished(kind: str, cfg: TrainConfig, run_dir: Path) -> bool:
    """done.json, or (a run finished outside a sweep or launcher) its last row and last checkpoint written."""
    if (run_dir / DONE_FILE).exists():
        return True
    rows = RunDir(run_dir).read_metrics()
    if not rows or max(int(r["step"]) for r in rows) < final_step(kind, cfg):  # type: ignore[call-overload]
        return False
    if not cfg.checkpoint_every:
        return True
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.exists():
        return False
    state = run_dir / "checkpoints" / pointer.read_text().strip() / "state.json"
    return state.exists() and json.loads(state.read_text())["next_step"] >= cfg.max_steps


def steps_done(kind: str, rows: Sequence[Mapping[str, object]]) -> int:
    """Updates made so far: an rl row is logged after its update, an sft row before it."""
    if not rows:
        return 0
    return max(int(r["step"]) for r in rows) + (1 if kind == "rl" else 0)  # type: ignore[call-overload]


def last_value(kind: str, rows: Sequence[Mapping[str, object]]) -> str:
    for key in LAST_KEYS[kind]:
        for row in reversed(rows):
            if isinstance(row.get(key), (int, float)):
                return f"{key} {row[key]:.4g}"
    return ""


# ------------------------------------------------------------------------------------ the status table


@dataclass(frozen=True)
class Status:
    """One line of the live table."""

    name: str
    gpus: str
    state: str  # waiting | running | done | failed | skipped (finished before) | taken (by another launcher)
    steps: str  # "12/200"
    last: str  # "reward_mean 0.4062"
    elapsed_s: float


def table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() + "\n" for r in rows)


def status_table(lines: Sequence[Status]) -> str:
    header = ("run", "gpus", "state", "step", "last", "elapsed")
    rows = [header] + [(s.name, s.gpus, s.state, s.steps, s.last, _duration(s.elapsed_s) if s.elapsed_s else "") for s in lines]
    counts = {state: sum(s.state == state for s in lines) for state in ("running", "waiting", "done", "failed", "skipped", "taken")}
    return table(rows) + ", ".join(f"{n} {state}" for state, n in counts.items() if n) + "\n"


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _ids(gpus: Sequence[int]) -> str:
    """GPU ids as --gpus takes them, neighbours as ranges: 0-3,6."""
    parts: list[str] = []
    i = 0
    while i < len(gpus):
        j = i
        while j + 1 < len(gpus) and gpus[j + 1] == gpus[j] + 1:
            j += 1
        parts.append(str(gpus[i]) if i == j else f"{gpus[i]}-{gpus[j]}")
        i = j + 1
    return ",".join(parts)


# ------------------------------------------------------------------------------------ the dry run


def initial_state(kind: str, point: Point) -> str:
    """'skipped' (finished) or 'waiting'; a run dir from another config stops the launch (ConfigError)."""
    run_dir = Path(str(point.config.run_dir))
    if RunDir(run_dir).status() != "new":
        check_same_config(point, run_dir)
    return "skipped" if is_finished(kind, point.config, run_dir) else "waiting"


def check_memory(plan: Plan, node: Node, gpu_memory_gib: float = 0.0) -> None:
    """Every RL run's memory plan (rlora.plan) on the GPUs it gets, before anything starts; an error names the run and the key.

    `gpu_memory_gib`: each GPU's memory; 0 = what torch sees on GPU 0, else an 80 GB H100's.
    Runs that share a GPU (`share` > 1) each get their share of its memory.
    """
    if plan.sweep.kind != "rl":
        return
    from rlora.config import RLConfig
    from rlora.plan import check_fits, cpu_node, gpu_node

    if node.cpu:
        host = cpu_node()
        device = dataclasses.replace(host, device_memory=host.device_memory // len(node.gpus))
    else:
        if not gpu_memory_gib:
            import torch

            gpu_memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 79.6
        device = gpu_node(1, gpu_memory_gib)
    for run, point in zip(plan.runs, plan.sweep.points):
        assert isinstance(point.config, RLConfig)
        memory = device.device_memory // (node.share if run.gpus == 1 and not node.cpu else 1)
        check_fits(point.config, dataclasses.replace(device, gpus=0 if node.cpu else run.gpus, device_memory=memory), what=f"run {run.name}")


def dry_run(plan: Plan, node: Node) -> str:
    """The placement of every unfinished run and its command line."""
    sweep = plan.sweep
    states = {p.name: initial_state(sweep.kind, p) for p in sweep.points}
    todo = [r for r in plan.runs if states[r.name] == "waiting"]
    placements = place(todo, node)
    points = {p.name: p for p in sweep.points}
    where = f"CPU slots {_ids(node.gpus)}" if node.cpu else f"GPUs {_ids(node.gpus)}"
    lines = [
        f"plan {sweep.path}: {len(plan.runs)} runs of kind {sweep.kind} in {sweep.out}, on {where} (share {node.share})",
        f"{len(todo)} to run, {len(plan.runs) - len(todo)} finished (skipped); waves as if every run took equally long "
        "(at run time a run starts as soon as its GPUs are free)",
        "",
        table([("wave", "gpus", "run")] + [(str(p.wave), _ids(p.gpus), p.run.name) for p in placements]),
    ]
    for p in placements:
        resume = RunDir(Path(str(points[p.run.name].config.run_dir))).status() == "partial"
        lines.append(f"# {p.run.name}{' (resume)' if resume else ''}\n{command_for(sweep.kind, points[p.run.name], p.gpus, node, resume).shell()}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ execution


@dataclass
class Task:
    """The launcher's mutable view of one run (the only mutable state in this module)."""

    run: Run
    point: Point
    state: str
    gpus: tuple[int, ...] = ()
    started: float = 0.0
    ended: float = 0.0
    resumed: bool = False
    proc: subprocess.Popen[bytes] | None = None
    lock: ExitStack | None = None

    @property
    def run_dir(self) -> Path:
        return Path(str(self.point.config.run_dir))


def start(task: Task, gpus: tuple[int, ...], kind: str, node: Node) -> None:
    """Claim the run (the sweep's flock) and start its child; a run someone else holds is 'taken'."""
    lock = ExitStack()
    if not lock.enter_context(RunDir(task.run_dir).claim()):
        lock.close()
        task.state = "taken"
        return
    if is_finished(kind, task.point.config, task.run_dir):  # again, under the lock: someone may have just finished it
        lock.close()
        task.state = "skipped"
        return
    task.resumed = RunDir(task.run_dir).status() == "partial"
    cmd = command_for(kind, task.point, gpus, node, task.resumed)
    with (task.run_dir / LOG_FILE).open("a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {cmd.shell()}\n")
        log.flush()
        task.proc = subprocess.Popen(cmd.argv, env={**os.environ, **dict(cmd.env)}, stdout=log, stderr=subprocess.STDOUT)
    task.state, task.gpus, task.started, task.lock = "running", gpus, time.time(), lock


def finish(task: Task, code: int) -> None:
    """Record how the child ended: the sweep's done marker, or error.txt with the end of its log."""
    task.ended = time.time()
    if code == 0:
        RunDir(task.run_dir).mark_done(task.ended - task.started, task.resumed)
        task.state = "done"
    else:
        tail = (task.run_dir / LOG_FILE).read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        (task.run_dir / ERROR_FILE).write_text(f"exit code {code} (launch.log ends:)\n" + "\n".join(tail) + "\n")
        task.state = "failed"
    assert task.lock is not None
    task.lock.close()


def status_of(task: Task, kind: str) -> Status:
    rows = RunDir(task.run_dir).read_metrics() if task.state != "waiting" else []
    max_steps = int(task.point.config.max_steps)
    elapsed = (task.ended or time.time()) - task.started if task.started else 0.0
    return Status(task.run.name, _ids(task.gpus), task.state, f"{min(steps_done(kind, rows), max_steps)}/{max_steps}", last_value(kind, rows), elapsed)


class Board:
    """The live table: redrawn in place every `refresh_s` on a terminal; in a log file, printed when
    a run changes state and at least every minute."""

    def __init__(self, out: TextIO, refresh_s: float) -> None:
        self.out, self.refresh_s = out, refresh_s
        self.tty = out.isatty()
        self.last_draw = 0.0
        self.last_states: tuple[str, ...] = ()

    def update(self, tasks: Sequence[Task], kind: str, force: bool = False) -> None:
        states = tuple(t.state for t in tasks)
        since = time.time() - self.last_draw
        due = since >= self.refresh_s if self.tty else states != self.last_states or since >= max(60.0, self.refresh_s)
        if not (due or force and self.tty):  # in a log, the last state change already printed the final table
            return
        table = status_table([status_of(t, kind) for t in tasks])
        self.out.write(("\x1b[H\x1b[J" if self.tty else "\n") + table)  # home + clear: redraw in place
        self.out.flush()
        self.last_draw, self.last_states = time.time(), states


def launch(plan: Plan, node: Node, refresh_s: float = 5.0, out: TextIO | None = None) -> dict[str, list[str]]:
    """Run the plan to the end; returns run names by final state (done, skipped, failed, taken)."""
    sweep = plan.sweep
    check_fits(plan.runs, node)
    tasks = [Task(run, point, initial_state(sweep.kind, point)) for run, point in zip(plan.runs, sweep.points)]
    write_sweep_record(sweep)  # sweep.json: `rlora analyze` reads a launch like a sweep
    by_name = {t.run.name: t for t in tasks}
    load = {g: 0 for g in node.gpus}
    board = Board(out or sys.stdout, refresh_s)
    try:
        while any(t.state in ("waiting", "running") for t in tasks):
            for run, gpus in assign([t.run for t in tasks if t.state == "waiting"], load, node):
                start(by_name[run.name], gpus, sweep.kind, node)
                if by_name[run.name].state == "running":
                    for g in gpus:
                        load[g] += cost(run, node)
            for task in tasks:
                code = task.proc.poll() if task.state == "running" and task.proc else None
                if code is not None:
                    finish(task, code)
                    for g in task.gpus:
                        load[g] -= cost(task.run, node)
            board.update(tasks, sweep.kind)
            time.sleep(POLL_S)
    except KeyboardInterrupt:  # stop the children too; each resumes from its checkpoint next time
        stop([t for t in tasks if t.state == "running"])
        raise
    board.update(tasks, sweep.kind, force=True)
    return {state: [t.run.name for t in tasks if t.state == state] for state in ("done", "skipped", "failed", "taken")}


def stop(tasks: Sequence[Task]) -> None:
    for task in tasks:
        if task.proc is not None:
            task.proc.terminate()
    for task in tasks:
        if task.proc is not None:
            task.proc.wait()
        if task.lock is not None:
            task.lock.close()
