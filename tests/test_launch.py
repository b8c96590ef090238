"""Launcher tests: --gpus parsing, the placement policy (packing, FullFT blocks, queueing, sharing,
a run too big for the node), plan files, command lines as data (torchrun for several GPUs), the
dry run, skip/resume/failure with a fake child process, and one tiny real launch on CPU (slow)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from rlora.config import ConfigError, RLConfig, from_dict, parse_overrides, save_config, to_dict
from rlora.experiments import launch as launch_mod
from rlora.experiments.launch import (
    Command,
    Node,
    Run,
    Status,
    assign,
    command_for,
    config_args,
    dry_run,
    format_override,
    is_finished,
    launch,
    load_plan,
    make_node,
    parse_gpus,
    pick,
    place,
    status_table,
)
from rlora.runs import RunDir

REPO = Path(__file__).resolve().parents[1]
NODE8 = Node(tuple(range(8)))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _runs(*sizes: int) -> list[Run]:
    return [Run(f"r{i}", n) for i, n in enumerate(sizes)]


def _by_run(placements) -> dict[str, tuple[tuple[int, ...], int]]:
    return {p.run.name: (p.gpus, p.wave) for p in placements}


# ----------------------------------------------------------------------------- the node


@pytest.mark.parametrize(
    "spec, ids",
    [
        ("0-7", (0, 1, 2, 3, 4, 5, 6, 7)),
        ("0,2,5", (0, 2, 5)),
        ("0-3,6", (0, 1, 2, 3, 6)),
        (" 4 , 1", (4, 1)),  # the order given is the order placement calls neighbours
        ("3", (3,)),
    ],
)
def test_gpu_specs(spec, ids):
    assert parse_gpus(spec) == ids
    assert parse_gpus(launch_mod._ids(ids)) == ids  # the tables print what --gpus reads


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "'' is not a GPU id"),
        ("0-7x", "'0-7x' is not a GPU id"),
        ("a,b", "'a' is not a GPU id"),
        ("-1", "'-1' is not a GPU id"),
        ("7-0", "'7-0' is not an increasing range"),
        ("0-3,2", "names GPU 2 twice"),
    ],
)
def test_bad_gpu_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_gpus(spec)


def test_node_from_the_command_line():
    assert make_node("0,2", 0) == Node((0, 2))
    assert make_node(None, 2, share=3) == Node((0, 1), 3, cpu=True)
    for gpus, slots in ((None, 0), ("0-1", 2)):
        with pytest.raises(ValueError, match="--gpus .* or --cpu-slots"):
            make_node(gpus, slots)


# ----------------------------------------------------------------------------- placement


def test_one_gpu_runs_fill_the_node_in_plan_order():
    placed = place(_runs(1, 1, 1), NODE8)
    assert [(p.run.name, p.gpus, p.wave) for p in placed] == [("r0", (0,), 0), ("r1", (1,), 0), ("r2", (2,), 0)]


def test_multi_gpu_runs_go_first_on_contiguous_blocks():
    placed = _by_run(place(_runs(1, 2, 1, 4), NODE8))
    assert placed == {"r3": ((0, 1, 2, 3), 0), "r1": ((4, 5), 0), "r0": ((6,), 0), "r2": ((7,), 0)}


def test_blocks_are_neighbours_in_the_gpus_list_not_in_id_order():
    placed = _by_run(place(_runs(2, 2), Node((6, 7, 0, 1))))
    assert placed == {"r0": ((6, 7), 0), "r1": ((0, 1), 0)}


def test_full_node_queues_in_waves():
    ones = _by_run(place(_runs(*[1] * 10), NODE8))
    assert [ones[f"r{i}"][1] for i in range(10)] == [0] * 8 + [1, 1]
    assert ones["r8"][0] == (0,) and ones["r9"][0] == (1,)
    fours = _by_run(place(_runs(4, 4, 4), NODE8))
    assert fours == {"r0": ((0, 1, 2, 3), 0), "r1": ((4, 5, 6, 7), 0), "r2": ((0, 1, 2, 3), 1)}


def test_a_run_bigger_than_the_node_is_named():
    with pytest.raises(ValueError, match=r"run 'big' needs 8 GPUs but the node has 4 \(0-3\)"):
        place([Run("small", 1), Run("big", 8)], Node((0, 1, 2, 3)))


def test_best_fit_keeps_long_stretches_whole():
    load = {g: 0 for g in range(8)} | {1: 1, 4: 1}  # free stretches: (0), (2, 3), (5, 6, 7)
    assert pick(1, load, NODE8) == (0,)
    assert pick(2, load, NODE8) == (2, 3)
    assert pick(3, load, NODE8) == (5, 6, 7)
    assert pick(4, load, NODE8) is None  # four GPUs are free, but not four neighbours


def test_backfill_starts_smaller_runs_while_a_big_one_waits():
    load = {g: 0 for g in range(8)} | {g: 1 for g in range(6)}  # only 6 and 7 free
    started = assign([Run("full", 4), Run("a", 1), Run("b", 1), Run("c", 1)], load, NODE8)
    assert [(r.name, gpus) for r, gpus in started] == [("a", (6,)), ("b", (7,))]


def test_sharing_packs_one_gpu_runs_and_never_shares_multi_gpu_runs():
    node = Node((0, 1), share=2)
    placed = _by_run(place(_runs(1, 1, 1, 2), node))
    assert placed["r3"] == ((0, 1), 0)  # the block first, alone on its GPUs
    assert [placed[r] for r in ("r0", "r1", "r2")] == [((0,), 1), ((0,), 1), ((1,), 1)]  # fill a GPU before the next
    assert pick(1, {0: 1, 1: 0}, node) == (0,)  # a half-used GPU before an idle one


def test_random_plans_never_overload_a_gpu_and_place_every_run_once():
    rng = random.Random(0)
    for _ in range(200):
        node = Node(tuple(rng.sample(range(16), rng.randint(1, 8))), share=rng.choice([1, 1, 2, 3]))
        runs = _runs(*[rng.choice([1, 1, 1, 2, 4]) for _ in range(rng.randint(1, 12))])
        runs = [r for r in runs if r.gpus <= len(node.gpus)]
        placed = place(runs, node)
        assert sorted(p.run.name for p in placed) == sorted(r.name for r in runs)
        for wave in {p.wave for p in placed}:
            load = {g: 0 for g in node.gpus}
            for p in placed:
                if p.wave == wave:
                    assert len(p.gpus) == p.run.gpus
                    at = node.gpus.index(p.gpus[0])
                    assert p.gpus == node.gpus[at : at + len(p.gpus)], "a block must be neighbours"
                    for g in p.gpus:
                        load[g] += launch_mod.cost(p.run, node)
            assert max(load.values()) <= node.share


# ----------------------------------------------------------------------------- plan files


PLAN = """
kind: rl
gpus_per_run: {lora: 1, full: 2, 32: 3}
fixed: {max_steps: 4, checkpoint_every: 2}
grid:
  - rank: [full]
    lr: [1.0e-5]
  - rank: [1, 32]
    lr: [1.0e-4, 1.0e-3]
"""


def test_plan_reads_gpus_per_run_by_rank(tmp_path):
    plan = load_plan(_write(tmp_path / "p.yaml", PLAN), out=tmp_path / "out")
    assert {r.name: r.gpus for r in plan.runs} == {
        "rank=full,lr=1e-05": 2,
        "rank=1,lr=0.0001": 1,
        "rank=1,lr=0.001": 1,
        "rank=32,lr=0.0001": 3,
        "rank=32,lr=0.001": 3,
    }
    assert plan.share == 1 and plan.sweep.kind == "rl" and [p.name for p in plan.sweep.points] == [r.name for r in plan.runs]
    assert plan.sweep.points[0].config.run_dir == str(tmp_path / "out" / "rank=full,lr=1e-05")


@pytest.mark.parametrize(
    "text, message",
    [
        ("kind: rl\ndevices: [cuda:0]\ngrid: {rank: [1]}\n", "unknown plan key 'devices'"),
        ("kind: rl\ngpus_per_rnu: 2\ngrid: {rank: [1]}\n", "unknown plan key 'gpus_per_rnu'"),
        ("kind: rl\ngpus_per_run: {full: 0}\ngrid: {rank: [1]}\n", "'gpus_per_run'.*full: must be an integer >= 1"),
        ("kind: rl\ngpus_per_run: {dora: 1}\ngrid: {rank: [1]}\n", "'dora' is not lora, full or a LoRA rank"),
        ("kind: rl\ngpus_per_run: two\ngrid: {rank: [1]}\n", "'gpus_per_run'.*must be an integer or a mapping"),
        ("kind: rl\nshare: 0\ngrid: {rank: [1]}\n", "'share'.*>= 1"),
        ("kind: rl\ngrid: {rnak: [1]}\n", "unknown config key 'rnak'"),
    ],
)
def test_bad_plans_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_plan(_write(tmp_path / "bad.yaml", text))


def test_example_plans_place_as_documented():
    gpu = load_plan(REPO / "configs" / "launch_8gpu_example.yaml")
    assert sorted(r.gpus for r in gpu.runs) == [1] * 6 + [4] * 3
    assert {dict(p.overrides)["rank"] for p in gpu.sweep.points} == {1, 32, "full"}
    assert all(p.config.model == "meta-llama/Llama-3.1-8B" for p in gpu.sweep.points)
    waves = [p.wave for p in place(gpu.runs, NODE8)]
    assert sorted(waves) == [0, 0, 1, 1, 1, 1, 1, 2, 2]  # docs/scale_out.md, "Placement"
    tiny = load_plan(REPO / "configs" / "launch_cpu_tiny.yaml")
    assert [r.gpus for r in tiny.runs] == [1, 1] and tiny.sweep.kind == "sft"


# ----------------------------------------------------------------------------- commands as data


@pytest.mark.parametrize(
    "value, text",
    [
        ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
        ("gsm8k,math500", "gsm8k,math500"),
        ("", '""'),
        ("true", '"true"'),
        ("1", '"1"'),
        ("null", '"null"'),
        ("a: b", '"a: b"'),
        (5e-06, "5e-06"),
        (True, "true"),
        (None, "null"),
    ],
)
def test_override_values_read_back_as_written(value, text):
    assert format_override(value) == text
    assert parse_overrides([f"k={text}"])["k"] in (value, str(value))  # a float the config coerces from "5e-06"


def test_config_args_rebuild_the_config_exactly():
    cfg = RLConfig(
        model="1", rank="full", lr=1.5e-6, train_data="", lora_targets="q_proj,v_proj", eval_benchmarks="gsm8k", run_dir="runs/x/rank=full,lr=1.5e-06"
    )
    args = config_args(cfg)
    assert args[:4] == ['model="1"', "rank=full", "lora_targets=q_proj,v_proj", "lr=1.5e-06"]  # what differs from the defaults, in field order
    assert "train_data=" not in " ".join(args)  # the default
    assert from_dict(RLConfig, parse_overrides(args)) == cfg


def test_one_gpu_run_is_a_plain_child_and_several_gpus_go_through_torchrun():
    plan = load_plan(REPO / "configs" / "launch_8gpu_example.yaml", out="runs/x")
    full, lora = plan.sweep.points[0], plan.sweep.points[3]
    one = command_for("rl", lora, (5,), NODE8, resume=False)
    assert one.argv[:4] == (sys.executable, "-m", "rlora.cli", "rl") and "rank=1" not in one.argv  # rank 1 is the default
    assert dict(one.env)["CUDA_VISIBLE_DEVICES"] == "5"
    four = command_for("rl", full, (4, 5, 6, 7), NODE8, resume=False)
    assert four.argv[:7] == (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "rlora.cli")
    assert four.argv[7] == "rl" and "rank=full" in four.argv and f"run_dir={full.config.run_dir}" in four.argv
    assert dict(four.env)["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    assert four.shell().startswith("CUDA_VISIBLE_DEVICES=4,5,6,7 PYTHONUNBUFFERED=1 python -m torch.distributed.run --standalone")
    resume = command_for("rl", full, (0, 1, 2, 3), NODE8, resume=True)
    assert resume.argv[7:] == ("rl", "--resume", full.config.run_dir)
    cpu = command_for("rl", lora, (1,), Node((0, 1), cpu=True), resume=False)
    assert "device=cpu" in cpu.argv and dict(cpu.env)["CUDA_VISIBLE_DEVICES"] == ""
    assert command_for("rl", lora, (1,), Node((0, 1), cpu=True), resume=True).argv[-3:] == ("--resume", lora.config.run_dir, "device=cpu")


# ----------------------------------------------------------------------------- finished runs and the dry run


def _finish(run_dir: Path, cfg: object, done_marker: bool = True) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    if done_marker:
        (run_dir / "done.json").write_text("{}\n")


def test_finished_is_done_json_or_last_row_and_last_checkpoint(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    cfg = RLConfig(max_steps=2, checkpoint_every=1)
    run.log({"step": 0})
    assert not is_finished("rl", cfg, run.path)
    run.log({"step": 1})
    assert not is_finished("rl", cfg, run.path)  # killed between its last row and its last checkpoint
    run.save_checkpoint(2, {"trainable": {}, "optimizer": {}})
    assert is_finished("rl", cfg, run.path)
    assert not is_finished("rl", RLConfig(max_steps=2, checkpoint_every=1, eval_every=1), run.path)  # the final eval row is missing
    assert is_finished("rl", RLConfig(max_steps=2, checkpoint_every=0), run.path)
    assert not is_finished("sft", cfg, run.path)  # sft's last row is step max_steps
    (run.path / "done.json").write_text("{}")
    assert is_finished("sft", cfg, run.path)


def test_dry_run_prints_placement_and_commands_and_skips_finished(tmp_path):
    plan = load_plan(_write(tmp_path / "p.yaml", PLAN), out=tmp_path / "out")
    points = {p.name: p for p in plan.sweep.points}
    _finish(tmp_path / "out" / "rank=1,lr=0.0001", points["rank=1,lr=0.0001"].config)
    _finish(tmp_path / "out" / "rank=1,lr=0.001", points["rank=1,lr=0.001"].config, done_marker=False)  # half-finished
    text = dry_run(plan, Node((0, 1, 2, 3)))
    assert "5 runs of kind rl" in text and "4 to run, 1 finished (skipped)" in text
    table = text.split("\n\n")[1].splitlines()
    assert table == [
        "wave  gpus  run",
        "0     0-2   rank=32,lr=0.0001",
        "0     3     rank=1,lr=0.001",  # backfilled beside the 3-GPU block
        "1     0-2   rank=32,lr=0.001",
        "2     0-1   rank=full,lr=1e-05",
    ]
    assert "rank=1,lr=0.0001" not in text
    assert "# rank=1,lr=0.001 (resume)\nCUDA_VISIBLE_DEVICES=3 PYTHONUNBUFFERED=1 python -m rlora.cli rl --resume" in text
    assert "--nproc_per_node=3" in text and not (tmp_path / "out" / "rank=32,lr=0.001").exists()  # a dry run starts nothing


def test_run_dir_of_another_config_stops_the_launch(tmp_path):
    plan = load_plan(_write(tmp_path / "p.yaml", PLAN), out=tmp_path / "out")
    point = plan.sweep.points[1]
    _finish(Path(point.config.run_dir), from_dict(RLConfig, {**to_dict(point.config), "max_steps": 9}), done_marker=False)
    with pytest.raises(ConfigError, match="max_steps=9 but the sweep now says max_steps=4"):
        dry_run(plan, NODE8)


def test_status_table():
    text = status_table(
        [
            Status("rank=1,lr=0.001", "0", "running", "12/200", "reward_mean 0.4062", 75.0),
            Status("rank=full,lr=1e-05", "4-7", "waiting", "0/200", "", 0.0),
        ]
    )
    assert text.splitlines() == [
        "run                 gpus  state    step    last                elapsed",
        "rank=1,lr=0.001     0     running  12/200  reward_mean 0.4062  0:01:15",
        "rank=full,lr=1e-05  4-7   waiting  0/200",
        "1 running, 1 waiting",
    ]
    rows = [{"step": 0, "train_loss": 2.0, "eval_loss": 3.0}, {"step": 1, "train_loss": 1.5}]
    assert launch_mod.last_value("sft", rows) == "eval_loss 3" and launch_mod.steps_done("sft", rows) == 1
    assert launch_mod.last_value("rl", [{"step": 4, "reward_mean": 0.25}]) == "reward_mean 0.25"
    assert launch_mod.steps_done("rl", [{"step": 4}]) == 5


# ----------------------------------------------------------------------------- execution with a fake child

FAKE_CHILD = """
import json, os, sys, time
from pathlib import Path
run_dir, config, resume = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "1"
t0 = time.time()
if not resume:
    (run_dir / "config.json").write_text(json.dumps(config))
print("child of", run_dir.name, "on", os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
time.sleep(0.3)
if (run_dir.parent / ("fail-" + run_dir.name)).exists():
    sys.exit(3)
start = sum(1 for _ in (run_dir / "metrics.jsonl").open()) if (run_dir / "metrics.jsonl").exists() else 0
with (run_dir / "metrics.jsonl").open("a") as f:
    for step in range(start, config["max_steps"] + 1):
        f.write(json.dumps({"step": step, "train_loss": 1.0 / (step + 1)}) + "\\n")
record = {"run": run_dir.name, "visible": os.environ["CUDA_VISIBLE_DEVICES"], "resume": resume, "start": t0, "end": time.time()}
with (run_dir.parent / "children.jsonl").open("a") as f:
    f.write(json.dumps(record) + "\\n")
"""


@pytest.fixture
def fake_child(tmp_path, monkeypatch):
    script = _write(tmp_path / "fake_child.py", FAKE_CHILD)

    def command(kind, point, gpus, node, resume):
        args = (point.config.run_dir, json.dumps(to_dict(point.config)), "1" if resume else "0")
        return Command((sys.executable, str(script), *args), (("CUDA_VISIBLE_DEVICES", ",".join(map(str, gpus))),))

    monkeypatch.setattr(launch_mod, "command_for", command)
    monkeypatch.setattr(launch_mod, "POLL_S", 0.05)


def _children(out: Path) -> list[dict]:
    path = out / "children.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_launch_skips_finished_resumes_partial_records_failures(tmp_path, fake_child, capsys):
    spec = _write(tmp_path / "p.yaml", "kind: sft\nfixed: {max_steps: 2}\ngrid: {rank: [1, 4, 16, full], lr: [0.1]}\n")
    plan = load_plan(spec, out=tmp_path / "out")
    out = tmp_path / "out"
    points = {p.name: p for p in plan.sweep.points}
    _finish(out / "rank=1,lr=0.1", points["rank=1,lr=0.1"].config)
    _finish(out / "rank=4,lr=0.1", points["rank=4,lr=0.1"].config, done_marker=False)
    RunDir(out / "rank=4,lr=0.1").log({"step": 0, "train_loss": 1.0})
    (out / "fail-rank=16,lr=0.1").touch()

    first = launch(plan, Node((0, 1), cpu=True), refresh_s=0.0)
    assert first == {"done": ["rank=4,lr=0.1", "rank=full,lr=0.1"], "skipped": ["rank=1,lr=0.1"], "failed": ["rank=16,lr=0.1"], "taken": []}
    children = {c["run"]: c for c in _children(out)}
    assert set(children) == {"rank=4,lr=0.1", "rank=full,lr=0.1"} and children["rank=4,lr=0.1"]["resume"]
    assert [r["step"] for r in RunDir(out / "rank=4,lr=0.1").read_metrics()] == [0, 1, 2]  # resumed, no step twice
    assert json.loads((out / "rank=4,lr=0.1" / "done.json").read_text())["resumed"] is True
    error = (out / "rank=16,lr=0.1" / "error.txt").read_text()
    assert error.startswith("exit code 3") and "child of rank=16,lr=0.1" in error
    assert "child of rank=full,lr=0.1" in (out / "rank=full,lr=0.1" / "launch.log").read_text()
    assert json.loads((out / "sweep.json").read_text())["kind"] == "sft"  # `rlora analyze` reads it like a sweep

    (out / "fail-rank=16,lr=0.1").unlink()
    second = launch(plan, Node((0, 1), cpu=True), refresh_s=0.0)
    assert second["done"] == ["rank=16,lr=0.1"] and len(second["skipped"]) == 3 and not second["failed"]
    assert not (out / "rank=16,lr=0.1" / "error.txt").exists()
    table = capsys.readouterr().out.split("\n\n")[-1]
    assert "rank=16,lr=0.1" in table and "done" in table and "2/2" in table and "1 done, 3 skipped" in table


def test_runs_on_the_same_gpu_never_overlap(tmp_path, fake_child):
    spec = _write(tmp_path / "p.yaml", "kind: sft\ngpus_per_run: {lora: 1, full: 2}\nfixed: {max_steps: 1}\ngrid: {rank: [1, 2, 4, full], lr: [0.1, 0.2]}\n")
    out = tmp_path / "out"
    outcome = launch(load_plan(spec, out=out), Node((0, 1, 2), cpu=True), refresh_s=0.0)
    assert len(outcome["done"]) == 8
    children = _children(out)
    spans = [(set(c["visible"].split(",")), c["start"], c["end"], c["run"]) for c in children]
    for gpus_a, start_a, end_a, a in spans:
        for gpus_b, start_b, end_b, b in spans:
            if a < b and gpus_a & gpus_b:
                assert end_a <= start_b or end_b <= start_a, f"{a} and {b} overlapped on GPU {gpus_a & gpus_b}"
    assert all(c["visible"] in ("0,1", "1,2") for c in children if "full" in c["run"])


def test_run_held_by_another_launcher_is_taken(tmp_path, fake_child):
    plan = load_plan(_write(tmp_path / "p.yaml", "kind: sft\nfixed: {max_steps: 1}\ngrid: {rank: [1, 4], lr: [0.1]}\n"), out=tmp_path / "out")
    with RunDir(tmp_path / "out" / "rank=1,lr=0.1").claim() as mine:
        assert mine
        outcome = launch(plan, Node((0,), cpu=True), refresh_s=0.0)
    assert outcome["taken"] == ["rank=1,lr=0.1"] and outcome["done"] == ["rank=4,lr=0.1"]


def test_cli_dry_run_and_errors(tmp_path):
    cmd = [sys.executable, "-m", "rlora.cli", "launch", "configs/launch_8gpu_example.yaml", "--out", str(tmp_path / "o"), "--dry-run"]
    ok = subprocess.run([*cmd, "--gpus", "0-7"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert ok.returncode == 0, ok.stderr
    assert "9 to run" in ok.stdout and ok.stdout.count("--nproc_per_node=4") == 3
    bad = subprocess.run([*cmd, "--gpus", "0-3,3"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert bad.returncode == 2 and "names GPU 3 twice" in bad.stderr
    small = subprocess.run([*cmd, "--gpus", "0-2"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert small.returncode == 2 and "run 'rank=full,learner_parallel=fsdp,lr=1.5e-06' needs 4 GPUs but the node has 3" in small.stderr


# ----------------------------------------------------------------------------- one tiny real launch


@pytest.mark.slow
def test_tiny_real_launch_on_cpu_slots(tmp_path):
    """rlora launch of rank 1 and FullFT (3 SFT steps each) on two CPU slots at once; again: all skipped."""
    out = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "rlora.cli", "launch", "configs/launch_cpu_tiny.yaml", "--cpu-slots", "2", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "2 trained, 0 already done" in first.stdout
    for name in ("rank=1,lr=0.001", "rank=full,lr=0.001"):
        run = out / name
        assert [r["step"] for r in RunDir(run).read_metrics()] == [0, 1, 2, 3]
        assert (run / "done.json").exists() and "device=cpu" in (run / "launch.log").read_text()
        assert json.loads((run / "config.json").read_text())["device"] == "cpu"
    times = [json.loads((out / n / "done.json").read_text())["time"] for n in ("rank=1,lr=0.001", "rank=full,lr=0.001")]
    assert "3/3" in first.stdout and "2 done" in first.stdout
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0 and "0 trained, 2 already done" in second.stdout
    assert [json.loads((out / n / "done.json").read_text())["time"] for n in ("rank=1,lr=0.001", "rank=full,lr=0.001")] == times
