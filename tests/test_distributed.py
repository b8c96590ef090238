"""Data-parallel learner: the shard arithmetic in one process, then a step over 2 processes (gloo,
CPU) against one process on the same batch, for rank-1 LoRA and FullFT replicated (ddp) and
FullFT sharded with FSDP2; and one `rlora rl` step under torchrun with a real engine (slow)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from rlora.rl.advantages import center
from rlora.rl.batching import build_batch
from rlora.rl.losses import LossSpec
from rlora.rl.types import Group, Prompt, Rollout, TrainBatch
from rlora.train.distributed import close_world, follow, lead, make_learner, shard_batch, shard_rows
from rlora.train.learner import Learner, LearnerSpec
from rlora.train.lora import LoRASpec

REPO = Path(__file__).resolve().parents[1]
LOSS = LossSpec(loss="tis", cap=2.0, temperature=1.0)  # the objective of every step below


def batch_of(num_prompts: int, seed: int = 0) -> TrainBatch:
    """Groups of 4 with mixed rewards and ragged lengths: 4 * num_prompts rows."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for p in range(num_prompts):
        prompt_ids = tuple(torch.randint(3, 128, (3 + p % 4,), generator=g).tolist())
        rollouts = []
        for i in range(4):
            completion = tuple(torch.randint(3, 128, (1 + (5 * i + 3 * p) % 9,), generator=g).tolist())
            lps = tuple((-torch.rand(len(completion), generator=g) * 3).tolist())
            rollouts.append(
                Rollout(prompt_ids=prompt_ids, completion_ids=completion, sampler_logprobs=lps, reward=float((i + p) % 3 == 0), text="", finish_reason="stop")
            )
        groups.append(
            Group(
                prompt=Prompt(problem_id=f"p{p}", question="q", prompt_ids=prompt_ids, reference="1", reward_task="number"),
                rollouts=tuple(rollouts),
                policy_version=0,
            )
        )
    batch = build_batch(groups, center, pad_id=0)
    assert batch is not None
    return batch


def spec_for(path: str, arm: str) -> LearnerSpec:
    # gaussian_ab: A and B both move in the first step; at scale 1 the random adapter (alpha 32)
    # makes the gradient ill-conditioned: micro-batch 3 vs 12 alone then differ by 1e-3 relative.
    lora = LoRASpec(rank=1, init="gaussian_ab", init_scale=0.02) if arm == "lora_r1" else None
    return LearnerSpec(model_path=path, lora=lora, lr=1e-3, dtype="float32", micro_batch=3, grad_clip=1e-3, seed=0)


def trainable_of(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------ one process


def test_shards_cover_every_row_once_with_equal_counts():
    for B in (1, 2, 7, 12):
        for W in (1, 2, 3, 5):
            rows = [shard_rows(B, r, W) for r in range(W)]
            assert sorted(sum(rows, [])) == list(range(B))
            assert max(map(len, rows)) - min(map(len, rows)) <= 1


def test_shard_batch_pads_with_empty_rows_and_keeps_tokens():
    batch = batch_of(3)  # 12 rows
    shards = [shard_batch(batch, r, 5) for r in range(5)]
    assert {s.tokens_B_T.shape[0] for s in shards} == {3}  # ceil(12 / 5), padded
    assert sum(s.num_tokens for s in shards) == batch.num_tokens
    pad = shards[4]  # rows 4 and 9, then one empty row
    assert torch.equal(pad.tokens_B_T[:2], batch.tokens_B_T[[4, 9]])
    assert pad.mask_B_T[2].sum() == 0 and pad.lengths_B[2] == 1 and pad.advantages_B[2] == 0


@pytest.mark.parametrize("arm", ["lora_r1", "full"])
def test_summed_shard_gradients_equal_the_whole_batch_gradient(tiny_model_path, arm):
    """The identity the distributed step rests on, without processes: sum over shards == whole batch."""
    batch = batch_of(3)
    norm = float(batch.num_tokens)  # the global N, as every rank uses
    learner = Learner(spec_for(tiny_model_path, arm))
    learner.backward(batch, LOSS, norm)
    whole = [p.grad.clone() for p in learner.trainable]
    summed = [torch.zeros_like(p) for p in learner.trainable]
    for rank in range(3):
        learner.backward(shard_batch(batch, rank, 3), LOSS, norm)
        for acc, p in zip(summed, learner.trainable):
            acc += p.grad
    for w, s in zip(whole, summed):
        assert torch.allclose(w, s, atol=1e-7)


# ------------------------------------------------------------------------------------ two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    """What torchrun would set for this process; make_learner reads it (through accelerate)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _rank_main(rank: int, world: int, port: int, model: str, arm: str, parallel: str, out: str) -> None:
    """One learner process: rank 0 leads a step (and, for FSDP, a handoff read and a checkpoint), rank 1 follows."""
    _join(rank, world, port)
    learner = make_learner(spec_for(model, arm), parallel)
    if rank == 0:
        _lead_one_step(learner, out)
    else:
        follow(learner)  # type: ignore[arg-type]
    close_world()


def _lead_one_step(learner: Learner, out: str) -> None:
    leader = lead(learner)
    stats = leader.train_step(batch_of(3), LOSS, float(batch_of(3).num_tokens))
    weights = dict(leader.weights())  # gathered whole under FSDP
    state = leader.state()
    probe = leader.sequence_logprobs([5, 9, 17, 33, 2])
    leader.close()  # type: ignore[union-attr]
    torch.save({"stats": stats, "weights": weights, "state": state, "probe": probe}, Path(out) / "rank0.pt")


@pytest.mark.parametrize(
    ("arm", "parallel", "model"), [("lora_r1", "ddp", "tied"), ("full", "ddp", "tied"), ("full", "fsdp", "tied"), ("full", "fsdp", "untied")]
)
def test_two_process_step_equals_one_process_step(tiny_model_path, tiny_untied_model_path, tmp_path, monkeypatch, arm, parallel, model):
    """Untied: FSDP shards the embedding and the output layer too. Each rank runs 2 micro-batches, so
    the one reduce-scatter per step (`fsdp_grad_reduce: step`) is what makes the sums agree."""
    path = tiny_model_path if model == "tied" else tiny_untied_model_path
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two learners on a shared 2-core machine
    mp.start_processes(_rank_main, args=(2, free_port(), path, arm, parallel, str(tmp_path)), nprocs=2, start_method="spawn")
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)

    one = Learner(spec_for(path, arm))
    before = trainable_of(one)
    batch = batch_of(3)
    expected = one.train_step(batch, LOSS, float(batch.num_tokens))
    after = trainable_of(one)
    assert got["stats"].keys() == expected.keys()
    for key, value in expected.items():
        assert got["stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert expected["grad_norm"] > 1e-3  # clipping was active: the global norm had to agree
    weights = got["weights"]
    moved = 0
    for name, value in after.items():
        assert torch.allclose(weights[name], value, atol=1e-6, rtol=0), name
        moved += not torch.equal(value, before[name])
    assert moved == len(after)  # every trainable tensor moved, in both runs
    assert got["probe"] == pytest.approx(one.sequence_logprobs([5, 9, 17, 33, 2]), abs=1e-5)
    assert got["state"]["trainable"].keys() == after.keys()


def _bf16_rank_main(rank: int, world: int, port: int, model: str, out: str) -> None:
    _join(rank, world, port)
    learner = make_learner(dataclasses.replace(spec_for(model, "full"), dtype="bfloat16"), "fsdp")
    if rank == 0:
        sharded = [n for n, p in learner.model.named_parameters() if not hasattr(p, "to_local")]
        units = learner.units  # type: ignore[attr-defined]
        _lead_one_step(learner, out)
        torch.save({"whole": sharded, "units": len(units)}, Path(out) / "layout.pt")
    else:
        follow(learner)  # type: ignore[arg-type]
    close_world()


def test_fsdp_bf16_mixed_precision_step_tracks_one_process(tiny_untied_model_path, tmp_path, monkeypatch):
    """bf16 under MixedPrecisionPolicy (no autocast): float32 shards, every parameter sharded (untied),
    and the step close to the 1-process autocast step (bf16 rounding differs, so a loose tolerance)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.start_processes(_bf16_rank_main, args=(2, free_port(), tiny_untied_model_path, str(tmp_path)), nprocs=2, start_method="spawn")
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)
    layout = torch.load(tmp_path / "layout.pt", weights_only=False)
    assert layout["whole"] == [] and layout["units"] == 2 + 1 + 1  # 2 layers, the decoder, the output layer
    assert all(v.dtype == torch.float32 for v in got["weights"].values())  # master weights stay float32
    one = Learner(dataclasses.replace(spec_for(tiny_untied_model_path, "full"), dtype="bfloat16"))
    batch = batch_of(3)
    expected = one.train_step(batch, LOSS, float(batch.num_tokens))
    assert got["stats"]["loss"] == pytest.approx(expected["loss"], rel=0.05, abs=1e-3)
    assert got["stats"]["grad_norm"] == pytest.approx(expected["grad_norm"], rel=0.05)


def test_fsdp_checkpoint_round_trip(tiny_model_path, tmp_path, monkeypatch):
    """A sharded learner's whole-state checkpoint loads back into sharded learners on every rank."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.start_processes(_rank_main, args=(2, free_port(), tiny_model_path, "full", "fsdp", str(tmp_path)), nprocs=2, start_method="spawn")
    state = torch.load(tmp_path / "rank0.pt", weights_only=False)["state"]
    torch.save(state, tmp_path / "state.pt")
    mp.start_processes(_resume_main, args=(2, free_port(), tiny_model_path, str(tmp_path)), nprocs=2, start_method="spawn")
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    for name, value in state["trainable"].items():
        assert torch.equal(resumed["weights"][name], value), name
    assert resumed["exp_avg_sq_nonzero"]  # the optimizer's moments came back too


def _resume_main(rank: int, world: int, port: int, model: str, out: str) -> None:
    _join(rank, world, port)
    learner = make_learner(spec_for(model, "full"), "fsdp")
    learner.load_state(torch.load(Path(out) / "state.pt", weights_only=False))  # every rank reads the run dir
    exp_avg_sq = [s["exp_avg_sq"] for s in learner.optimizer.state.values()]
    nonzero = bool(exp_avg_sq) and all(float(v.to_local().abs().sum() if hasattr(v, "to_local") else v.abs().sum()) > 0 for v in exp_avg_sq)
    if rank == 0:
        leader = lead(learner)
        weights = dict(leader.weights())
        leader.close()  # type: ignore[union-attr]
        torch.save({"weights": weights, "exp_avg_sq_nonzero": nonzero}, Path(out) / "resumed.pt")
    else:
        follow(learner)  # type: ignore[arg-type]
    close_world()


# ------------------------------------------------------------------------------------ rlora rl under torchrun


def launcher(name: str) -> list[str]:
    """Two learner processes through torchrun or accelerate (its --multi_gpu launcher is torch's, and runs on CPU)."""
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", "--multi_gpu", "--num_processes=2", f"--main_process_port={free_port()}", "-m"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launch", "arm"),
    [("torchrun", "rank=1 lr=1e-3"), ("accelerate", "rank=full learner_parallel=fsdp lr=1e-5")],
    ids=["torchrun_lora_r1_ddp", "accelerate_full_fsdp"],
)
def test_rl_step_with_two_learner_processes(tmp_path, launch, arm):
    """`rlora rl` with 2 learner processes: rank 0's engine in its own process, a step, the handoff, a checkpoint."""
    run_dir = tmp_path / "run"
    tiny = ["prompts_per_step=2", "group_size=4", "max_tokens=12", "kv_cache_gib=1", "micro_batch=8", "max_steps=1", "checkpoint_every=1"]
    cmd = [*launcher(launch), "rlora.cli", "rl", *tiny, *arm.split(), f"run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] and rows[0]["tokens"] > 0
    assert rows[0]["probe_gap"] < 0.1  # bf16 engine and learner agree after the handoff
    ckpt = run_dir / "checkpoints" / "step_000001"
    assert (ckpt / "trainable.pt").exists() and (ckpt / "adapter").exists() == arm.startswith("rank=1")
