"""GPU-path contracts that a CPU machine can check: vLLM's argument objects for a CUDA engine, the
sleep order, the control plane's group, checkpoint retention, and rl-multi's device placement."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from rlora.config import ConfigError, RLConfig
from rlora.engine.sampler import EngineSpec, Sampler, engine_kwargs, lora_kwargs
from rlora.runs import RunDir
from rlora.train.placement import plan_placement

CUDA_LORA = EngineSpec(
    model_path="meta-llama/Llama-3.1-8B",
    device="cuda",
    dtype="bfloat16",
    lora_rank=32,
    gpu_memory_utilization=0.4,
    max_model_len=2048,
    device_ids=(2, 3),
    tensor_parallel_size=2,
    in_process=False,
    sleep_mode=True,
    max_loras=3,
)


@pytest.mark.parametrize("spec", [CUDA_LORA, dataclasses.replace(CUDA_LORA, lora_rank=None, device_ids=(), tensor_parallel_size=1, sleep_mode=False)])
def test_vllm_engine_args_and_lora_config_build_for_a_cuda_spec(spec):
    """Every key rlora passes is a field of vLLM's EngineArgs (a renamed one raises TypeError), without starting anything."""
    from vllm.config import LoRAConfig
    from vllm.engine.arg_utils import EngineArgs

    kwargs = engine_kwargs(spec)
    args = EngineArgs(**kwargs)
    assert args.gpu_memory_utilization == spec.gpu_memory_utilization and args.logprobs_mode == "processed_logprobs"
    assert "kv_cache_memory_bytes" not in kwargs and "enforce_eager" not in kwargs  # CPU-only knobs
    if spec.lora_rank is not None:
        assert args.enable_lora and args.enable_sleep_mode and list(args.device_ids) == [2, 3]
        config = LoRAConfig(**{k: v for k, v in lora_kwargs(spec).items() if k != "enable_lora"})
        assert (config.max_lora_rank, config.max_loras, config.max_cpu_loras) == (32, 3, 4)
    else:
        assert not args.enable_lora


class FakeLLM:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def sleep(self, level: int) -> None:
        self.calls.append(f"sleep({level})")

    def wake_up(self) -> None:
        self.calls.append("wake_up")


@pytest.mark.parametrize("lora_rank,level", [(1, 1), (None, 2)])
def test_sleep_empties_the_learner_cache_before_the_engine_wakes(lora_rank, level):
    calls: list[str] = []
    sampler = Sampler.__new__(Sampler)  # no engine: the order of calls is the contract
    sampler.spec = dataclasses.replace(CUDA_LORA, lora_rank=lora_rank)
    sampler.llm = FakeLLM(calls)
    with sampler.asleep(lambda: calls.append("empty_cache")):
        calls.append("learn")
    assert calls == [f"sleep({level})", "learn", "empty_cache", "wake_up"]
    awake = Sampler.__new__(Sampler)
    awake.spec, awake.llm = dataclasses.replace(CUDA_LORA, sleep_mode=False), FakeLLM(calls := [])
    with awake.asleep(lambda: calls.append("empty_cache")):
        calls.append("learn")
    assert calls == ["learn"]


def test_control_plane_is_a_gloo_group_with_an_explicit_timeout(tmp_path, monkeypatch):
    import torch.distributed as dist

    from rlora.train import distributed

    monkeypatch.setenv("RLORA_CONTROL_TIMEOUT_S", "123")
    made: list[dict[str, object]] = []
    new_group = dist.new_group
    monkeypatch.setattr(dist, "new_group", lambda **kw: made.append(kw) or new_group(**kw))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        distributed.control_group.cache_clear()
        assert distributed.broadcast_object(("train_step", (1,))) == ("train_step", (1,))
        assert distributed.broadcast_object("again") == "again"
        assert made == [{"backend": "gloo", "timeout": timedelta(seconds=123)}]  # one group, made once
    finally:
        distributed.close_world()


def test_keep_last_k_full_states_and_older_snapshots_in_the_engine_dtype(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    for step in (1, 2, 3, 4):
        state = {"trainable": {"w": torch.full((3,), float(step)), "ids": torch.arange(3)}, "optimizer": {"step": step}}
        run.save_checkpoint(step, state, keep=2, snapshot_dtype="bfloat16")
    root = tmp_path / "checkpoints"
    for step, full in ((1, False), (2, False), (3, True), (4, True)):
        files = {p.name for p in (root / f"step_{step:06d}").iterdir()}
        assert ("optimizer.pt" in files and "rng.pt" in files) == full, (step, files)
        w = torch.load(root / f"step_{step:06d}" / "trainable.pt", weights_only=True)
        assert w["w"].dtype == (torch.float32 if full else torch.bfloat16) and w["ids"].dtype == torch.int64
    loads: list[dict[str, object]] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw) or real_load(*a, **kw))
    next_step, loaded = RunDir.load_checkpoint(root / "step_000003")
    assert next_step == 3 and torch.equal(loaded["trainable"]["w"], torch.full((3,), 3.0))
    assert [kw.get("mmap") for kw in loads[:2]] == [True, True]  # resume reads lazily: a rank touches only its slices
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        RLConfig(keep_checkpoints=0)


def test_rl_multi_engine_follows_a_pinned_gpu():
    from rlora.rl.multi import multi_engine_spec

    cfg = RLConfig(device="cuda:3", dtype="bfloat16")
    place = plan_placement("colocate", 1, 1, 0, 1, "cuda:3", 8, (0, 1))
    spec = multi_engine_spec([cfg, dataclasses.replace(cfg, rank=8)], "m", "cuda:3", place, 0)
    assert place.learner_device == "cuda:3" and spec.device_ids == (3,) and spec.device == "cuda" and spec.lora_rank == 8


def test_file_handoff_falls_back_to_disk_when_shm_is_small(tmp_path, monkeypatch, capsys):
    import shutil
    import tempfile
    from collections import namedtuple

    from rlora.engine import sampler as sampler_module

    shm, disk = tmp_path / "shm", tmp_path / "disk"
    shm.mkdir()
    disk.mkdir()
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 40, 0, (100 << 20) if Path(p) == shm else (1 << 40)))
    monkeypatch.setattr(tempfile, "tempdir", str(disk))
    small = sampler_module.handoff_root(1 << 20, shm=shm)  # an adapter: /dev/shm has room
    assert small.parent == shm
    big = sampler_module.handoff_root(16 << 30, shm=shm)  # 8B FullFT weights in bf16: a 100 MB /dev/shm has not
    assert big.parent == disk and "--shm-size" in capsys.readouterr().err
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 40, 0, 1 << 20))
    with pytest.raises(RuntimeError, match="neither"):
        sampler_module.handoff_root(16 << 30, shm=shm)


def test_full_weights_are_written_in_the_engine_dtype(tmp_path):
    from safetensors import safe_open

    from rlora.engine.sampler import save_safetensors

    save_safetensors([("w", torch.ones(2, 3)), ("b", torch.zeros(3))], tmp_path / "m.safetensors", torch.bfloat16)
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_adapters_are_written_in_the_engine_dtype(tiny_model_path, tmp_path):
    from safetensors import safe_open

    from rlora.train.learner import Learner, LearnerSpec
    from rlora.train.lora import LoRASpec

    learner = Learner(LearnerSpec(model_path=tiny_model_path, lora=LoRASpec(rank=1), lr=1e-3, dtype="bfloat16"))
    learner.write_adapter(tmp_path / "a")
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------ FullFT handoff in GPU memory


@pytest.mark.parametrize(
    "choice,device,in_process,placement,expected",
    [
        ("auto", "cuda", True, "colocate", "direct"),
        ("auto", "cuda", False, "colocate", "ipc"),
        ("auto", "cuda", False, "sleep", "ipc"),
        ("auto", "cuda", False, "split", "nccl"),
        ("file", "cuda", False, "colocate", "file"),
        ("nccl", "cuda", False, "colocate", "nccl"),
        ("auto", "cpu", False, "colocate", "file"),
        ("auto", "cpu", True, "colocate", "direct"),
    ],
)
def test_transfer_choice(choice, device, in_process, placement, expected):
    from rlora.engine.weight_sync import choose_transfer

    assert choose_transfer(choice, device, in_process, placement) == expected


@pytest.mark.parametrize("choice,device,placement", [("ipc", "cpu", "colocate"), ("nccl", "cpu", "colocate"), ("ipc", "cuda", "split")])
def test_impossible_transfers_name_the_key(choice, device, placement):
    from rlora.engine.weight_sync import choose_transfer

    with pytest.raises(ConfigError, match="config key 'weight_transfer'"):
        choose_transfer(choice, device, False, placement)


def test_vllm_weight_transfer_api_is_the_one_written_against(tiny_model_path):
    """Engine argument, trainer init infos, the client protocol and the weight source, all on CPU."""
    from vllm.distributed.weight_transfer.base import VLLMWeightSyncClient
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo, IPCTrainerWeightTransferEngine
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine
    from vllm.engine.arg_utils import EngineArgs

    from rlora.engine.weight_sync import EngineClient, model_source
    from rlora.train.learner import Learner, LearnerSpec

    args = EngineArgs(**engine_kwargs(dataclasses.replace(CUDA_LORA, lora_rank=None, weight_transfer="ipc")))
    assert args.weight_transfer_config.backend == "ipc"
    assert IPCTrainerInitInfo(rank=0, packed=True).is_sender and not NCCLTrainerInitInfo(rank=1, master_address="h", master_port=1, world_size=3).is_sender
    assert callable(IPCTrainerWeightTransferEngine.trainer_init) and callable(NCCLTrainerWeightTransferEngine.trainer_init)
    assert isinstance(EngineClient(None), VLLMWeightSyncClient)
    learner = Learner(LearnerSpec(model_path=tiny_model_path, lora=None, lr=1e-3, dtype="float32"))
    source = model_source(learner.model, torch.bfloat16)
    meta = source.metadata()  # type: ignore[attr-defined]
    pairs = list(source)  # type: ignore[call-overload]
    assert [m.name for m in meta] == [n for n, _ in pairs] and all(t.dtype == torch.bfloat16 for _, t in pairs)
    assert [tuple(t.shape) for _, t in pairs] == [m.shape for m in meta]


class RecordingLLM:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[object]:
        self.calls.append(method)
        return [True]

    def reset_prefix_cache(self) -> None:
        self.calls.append("reset_prefix_cache")


def test_pushed_weights_reach_the_engine_through_the_transfer(tiny_model_path):
    """With a transfer attached, the learner hands the sampler a push, not tensors; the sampler pushes, reties, resets."""
    from rlora.rl.types import PushedWeights
    from rlora.train.learner import Learner, LearnerSpec

    learner = Learner(LearnerSpec(model_path=tiny_model_path, lora=None, lr=1e-3, dtype="bfloat16"))
    sent: list[str] = []
    learner.transfer = type("FakeTransfer", (), {"send_weights": lambda self: sent.append("send")})()
    weights = learner.weights()
    assert isinstance(weights, PushedWeights) and weights.nbytes == 2 * sum(p.numel() for p in learner.model.parameters())
    with pytest.raises(TypeError):
        list(weights)
    sampler = Sampler.__new__(Sampler)
    sampler.spec = dataclasses.replace(CUDA_LORA, lora_rank=None, weight_transfer="ipc")
    sampler.llm, sampler.versions = RecordingLLM(), {}
    sampler.load_weights(weights, 1)
    assert sent == ["send"] and sampler.llm.calls == ["retie_word_embeddings", "reset_prefix_cache"]
    assert sampler.version == 1 and sampler.handoff_bytes == weights.nbytes


def test_cuda_worker_and_v2_model_runner_have_what_rlora_calls():
    """CUDA vLLM runs the V2 model runner (the CPU build V1): every worker method rlora reaches by RPC, and
    the runner methods WorkerExtension and the FullFT reload use, exist in the CUDA classes too."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as RunnerV2
    from vllm.v1.worker.gpu_worker import Worker

    for method in ("sleep", "wake_up", "reload_weights", "init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update"):
        assert hasattr(Worker, method), method
    assert hasattr(RunnerV2, "get_model") and hasattr(RunnerV2, "reload_weights")
