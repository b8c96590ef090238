"""Placement: the device plan as a table of (config, machine) -> devices, the errors that name
their key, the config keys, and (slow) the sampler with tensor parallelism 2 on CPU in its own
process, whose FullFT handoff goes through a file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlora.config import ConfigError, RLConfig, load_config
from rlora.engine.sampler import EngineSpec, Sampler, placement_kwargs
from rlora.train.placement import Placement, cpu_threads_bind, plan_placement

TWO_CORES = (0, 1)

# (placement, tp, world, local_rank, local_world, device, gpus) -> (sampler GPUs, learner device, engine in process, sleep, CPU bind)
PLANS = [
    (("colocate", 1, 1, 0, 1, "cpu", 0), ((), "cpu", True, False, "")),
    (("colocate", 1, 2, 1, 2, "cpu", 0), ((), "cpu", False, False, "")),  # torchrun: engine in its own process
    (("colocate", 2, 1, 0, 1, "cpu", 0), ((), "cpu", False, False, "0|1")),  # CPU TP: one core group per worker
    (("colocate", 1, 1, 0, 1, "cuda", 1), ((0,), "cuda:0", True, False, "")),
    (("colocate", 1, 1, 0, 1, "cuda:3", 4), ((3,), "cuda:3", True, False, "")),
    (("colocate", 2, 1, 0, 1, "cuda", 2), ((0, 1), "cuda:0", False, False, "")),
    (("colocate", 1, 4, 3, 4, "cuda", 4), ((0,), "cuda:3", False, False, "")),
    (("colocate", 2, 4, 1, 4, "cuda", 8), ((0, 1), "cuda:1", False, False, "")),
    (("split", 1, 1, 0, 1, "cuda", 2), ((0,), "cuda:1", True, False, "")),
    (("split", 2, 2, 0, 2, "cuda", 4), ((0, 1), "cuda:2", False, False, "")),
    (("split", 2, 2, 1, 2, "cuda", 8), ((0, 1), "cuda:3", False, False, "")),
    (("sleep", 1, 1, 0, 1, "cuda", 1), ((0,), "cuda:0", True, True, "")),
    (("sleep", 2, 2, 1, 2, "cuda", 2), ((0, 1), "cuda:1", False, True, "")),
]


@pytest.mark.parametrize(("args", "expected"), PLANS, ids=[" ".join(map(str, a)) for a, _ in PLANS])
def test_plan(args, expected):
    assert plan_placement(*args, cpu_cores=TWO_CORES) == Placement(*expected)


ERRORS = [
    (("nowhere", 1, 1, 0, 1, "cuda", 2), "'placement' must be one of"),
    (("split", 1, 1, 0, 1, "cpu", 0), "split .* needs CUDA"),
    (("sleep", 1, 1, 0, 1, "cpu", 0), "sleep needs CUDA: vLLM's sleep mode is not available on CPU"),
    (("split", 1, 1, 0, 1, "cuda", 1), "'placement': split .* needs 2 GPUs; 1 visible"),
    (("colocate", 4, 1, 0, 1, "cuda", 2), "needs 4 GPUs; 2 visible"),
    (("colocate", 1, 3, 0, 3, "cuda", 2), "needs 3 GPUs; 2 visible"),
    (("split", 2, 2, 0, 2, "cuda", 3), "needs 4 GPUs; 3 visible"),
    (("colocate", 1, 1, 0, 1, "cuda:5", 2), "'device' names 'cuda:5'"),
    (("colocate", 1, 2, 0, 2, "cuda:0", 2), "'device' pins one GPU"),
    (("colocate", 1, 1, 0, 1, "cuda", 0), "'device' is 'cuda' but torch sees no CUDA device"),
    (("colocate", 3, 1, 0, 1, "cpu", 0), "'tensor_parallel_size' is 3, but only 2 CPU cores"),
    (("colocate", 0, 1, 0, 1, "cpu", 0), "'tensor_parallel_size' must be >= 1"),
]


@pytest.mark.parametrize(("args", "match"), ERRORS, ids=[" ".join(map(str, a)) for a, _ in ERRORS])
def test_impossible_plans_name_their_key(args, match):
    with pytest.raises(ConfigError, match=match):
        plan_placement(*args, cpu_cores=TWO_CORES)


def test_cpu_threads_bind_splits_cores_into_contiguous_groups():
    assert cpu_threads_bind((0, 1), 2) == "0|1"
    assert cpu_threads_bind((3, 2, 1, 0), 2) == "0,1|2,3"
    assert cpu_threads_bind((4, 5, 6, 7, 8), 2) == "4,5|6,7"  # a leftover core stays free


def test_config_keys():
    cfg = load_config(RLConfig, None, ["placement=split", "tensor_parallel_size=2", "rank=full", "learner_parallel=fsdp"])
    assert (cfg.placement, cfg.tensor_parallel_size, cfg.learner_parallel) == ("split", 2, "fsdp")
    assert (RLConfig().placement, RLConfig().tensor_parallel_size, RLConfig().learner_parallel) == ("colocate", 1, "ddp")
    with pytest.raises(ConfigError, match="'learner_parallel': fsdp shards full fine-tuning"):
        load_config(RLConfig, None, ["learner_parallel=fsdp"])  # rank 1 LoRA
    with pytest.raises(ConfigError, match="'tensor_parallel_size' must be >= 1"):
        load_config(RLConfig, None, ["tensor_parallel_size=0"])


def test_bad_choices_fail_before_any_model_or_engine(tmp_path):
    from rlora.rl.loop import run_rl

    with pytest.raises(ConfigError, match=r"'learner_parallel' must be one of \['ddp', 'fsdp'\], got 'zero3'"):
        load_config(RLConfig, None, ["learner_parallel=zero3"])  # an invalid choice fails when the config loads
    cfg = load_config(RLConfig, None, ["placement=sleep", "device=cpu", "model=/nonexistent", f"run_dir={tmp_path / 'sleep'}"])
    with pytest.raises(ConfigError, match="sleep needs CUDA"):
        run_rl(cfg, progress=False)  # a placement the machine cannot hold fails before any model or engine


def test_engine_arguments_follow_the_placement():
    assert placement_kwargs(EngineSpec(model_path="m")) == {"tensor_parallel_size": 1}
    spec = EngineSpec(model_path="m", device="cuda", device_ids=(2, 3), tensor_parallel_size=2, sleep_mode=True)
    assert placement_kwargs(spec) == {"tensor_parallel_size": 2, "device_ids": [2, 3], "enable_sleep_mode": True}


def test_asleep_is_a_no_op_without_sleep_mode():
    """No engine call at all unless sleep mode is on (the engine here is a stand-in)."""
    calls: list[str] = []

    class Engine:
        def sleep(self, level: int) -> None:
            calls.append(f"sleep{level}")

        def wake_up(self) -> None:
            calls.append("wake")

    for sleep_mode, expected in ((False, []), (True, ["sleep1", "wake"])):
        sampler = Sampler.__new__(Sampler)  # no engine start
        sampler.spec, sampler.llm = EngineSpec(model_path="m", sleep_mode=sleep_mode), Engine()
        calls.clear()
        with sampler.asleep():
            assert calls == expected[:1]
        assert calls == expected


# ------------------------------------------------------------------------------------ real engine


@pytest.mark.slow
def test_tensor_parallel_engine_on_cpu_with_file_handoff(tiny_model_with_tokenizer):
    from rlora.rl.handoff import probe_ids
    from rlora.train.learner import Learner, LearnerSpec

    path = tiny_model_with_tokenizer
    place = plan_placement("colocate", 2, 1, 0, 1, "cpu", 0, cpu_cores=TWO_CORES)
    sampler = Sampler(
        EngineSpec(
            model_path=path,
            device="cpu",
            dtype="float32",
            lora_rank=None,
            max_num_seqs=8,
            max_model_len=256,
            tensor_parallel_size=2,
            in_process=place.engine_in_process,
            cpu_threads_bind=place.cpu_threads_bind,
        )
    )
    try:
        learner = Learner(LearnerSpec(model_path=path, lora=None, lr=1e-5, dtype="float32"))
        ids = probe_ids(sampler.tokenizer)
        gap = lambda: float(np.abs(np.array(sampler.prompt_logprobs(ids)) - np.array(learner.sequence_logprobs(ids))).mean())  # noqa: E731
        assert gap() < 1e-4
        base = np.array(sampler.prompt_logprobs(ids))
        with torch.no_grad():
            w = learner.model.model.layers[1].mlp.down_proj.weight
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
        sampler.load_weights(learner.weights(), 1)  # across processes: a safetensors file, loaded by both TP workers
        assert np.abs(np.array(sampler.prompt_logprobs(ids)) - base).mean() > 1e-3 and gap() < 1e-4
        samples = sampler.sample([_prompt(ids[:8])], 2, 4, 1.0)
        assert len(samples[0]) == 2 and all(len(s.completion_ids) == len(s.sampler_logprobs) for s in samples[0])
    finally:
        sampler.close()


def _prompt(ids: list[int]):
    from rlora.rl.types import Prompt

    return Prompt(problem_id="p", question="q", prompt_ids=tuple(ids), reference="1", reward_task="number")


def test_handoff_drops_only_vllm_reload_notes_and_only_during_the_call():
    import logging

    from rlora.engine.sampler import expected_reload_notes_unlogged

    utils = logging.getLogger("vllm.model_executor.models.utils")
    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    for logger in (utils, layerwise):
        logger.addHandler(handler)
    try:
        with expected_reload_notes_unlogged():
            utils.warning("Attempted to load weight %s with dtype %s into parameter with dtype %s", "w", "f32", "bf16")
            layerwise.warning("%s: Failed to load weights", "RotaryEmbedding")
            utils.warning("Failed to load weights")  # anything else still gets through
        utils.warning("Attempted to load weight %s with dtype %s into parameter with dtype %s", "w", "f32", "bf16")
        layerwise.warning("%s: Failed to load weights", "ParallelLMHead")
    finally:
        for logger in (utils, layerwise):
            logger.removeHandler(handler)
    assert seen == [
        "Failed to load weights",
        "Attempted to load weight w with dtype f32 into parameter with dtype bf16",
        "ParallelLMHead: Failed to load weights",
    ]
