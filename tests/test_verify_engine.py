"""Verified delivery on the real CPU engine: every injected handoff fault stops the run at its step.

Each fault is injected through the real engine (a Sampler method skipped or fed the wrong tensors,
one worker's served tensor changed over `collective_rpc`, an engine started from another
checkpoint), after a realistic optimizer step: every trainable weight moves by lr x sign(noise),
the size of a first AdamW step, at the ends of the realistic learning-rate ranges (FullFT 1e-6
and 1e-4, LoRA 1e-5 and 1e-3), in float32 and in bfloat16. Each must raise HandoffError at the
version where it happens, naming the worker and the tensor; the correct handoff after it passes.
A random 2-layer model with the default tokenizer keeps bf16 affordable on AVX2-only CPUs.
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlora.config import RLConfig
from rlora.engine.sampler import DEFAULT_TENANT, EngineSpec, Sampler
from rlora.rl.handoff import HandoffError, Probe, make_probe, publish
from rlora.rl.multi import shared_base_learners
from rlora.train import lora
from rlora.train.learner import Learner, LearnerSpec
from rlora.train.placement import plan_placement

pytestmark = pytest.mark.slow
LRS = {"lora": (1e-5, 1e-3), "full": (1e-6, 1e-4)}
LAYER = "model.layers.1.mlp.down_proj"  # the layer whose tensor a partial handoff leaves old


def optimizer_step(learner: Learner, lr: float, seed: int) -> None:
    """Every trainable weight moves by lr x sign(noise): the size of a first AdamW step."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learner.trainable:
            p.add_(torch.randn(p.shape, generator=gen).sign() * lr)


def make_learner(path: str, arm: str, dtype: str, seed: int = 0) -> Learner:
    spec = lora.LoRASpec(rank=1) if arm == "lora" else None
    return Learner(LearnerSpec(model_path=path, lora=spec, lr=1e-4, dtype=dtype, seed=seed))


def make_sampler(path: str, arm: str, dtype: str, **kwargs: object) -> Sampler:
    return Sampler(EngineSpec(model_path=path, device="cpu", dtype=dtype, lora_rank=1 if arm == "lora" else None, max_num_seqs=8, max_model_len=256, **kwargs))  # type: ignore[arg-type]


def close(sampler: Sampler) -> None:
    sampler.close()
    gc.collect()


class Run:
    """A learner, an engine and a probe, with the version counter a run would keep."""

    def __init__(self, learner: Learner, sampler: Sampler, version: int = 0) -> None:
        self.learner, self.sampler, self.version = learner, sampler, version
        self.probe: Probe = make_probe(sampler.tokenizer, sampler.spec.dtype)

    def publish(self) -> dict[str, float]:
        stats = publish(self.learner, self.sampler, self.version, self.probe)
        self.version += 1
        return stats

    def fault(self, method: str, replacement: Callable[..., None], match: str) -> None:
        """One handoff with the Sampler's `method` replaced: it must stop at this version, naming `match`."""
        original = getattr(self.sampler, method)
        setattr(self.sampler, method, replacement)
        try:
            with pytest.raises(HandoffError, match=rf"policy v{self.version}: .*{match}") as caught:
                publish(self.learner, self.sampler, self.version, self.probe)
        finally:
            setattr(self.sampler, method, original)
        assert "worker" in str(caught.value), caught.value
        self.version += 1


def old_tensor_in(weights: Iterable[tuple[str, torch.Tensor]], name: str, old: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The learner's weights with one tensor at its previous value (a partial FullFT handoff)."""
    for n, t in weights:
        yield n, (old if n == name else t)


def fullft_faults(run: Run, lr: float, k: int, skip_match: str = "worker 0 .*weight") -> dict[str, float]:
    """FullFT faults 1-3 at one learning rate, each after its own optimizer step: the load skipped, the
    previous version served, one tensor of one layer left old. Each must stop the run at its version;
    the correct handoff after each passes (its statistics returned for the last one)."""
    learner, sampler = run.learner, run.sampler
    optimizer_step(learner, lr, seed=10 * k)
    run.fault("load_weights", lambda weights, version: None, skip_match)
    run.publish()
    before = {n: t.clone() for n, t in learner.weights()}
    optimizer_step(learner, lr, seed=10 * k + 1)
    stale = lambda weights, version, before=before: Sampler.load_weights(sampler, iter(before.items()), version)  # noqa: E731
    run.fault("load_weights", stale, "worker 0 .*weight")
    run.publish()
    name = f"{LAYER}.weight"
    old = dict(learner.weights())[name].clone()
    optimizer_step(learner, lr, seed=10 * k + 2)
    one_old = lambda weights, version, name=name, old=old: Sampler.load_weights(sampler, old_tensor_in(weights, name, old), version)  # noqa: E731
    run.fault("load_weights", one_old, rf"worker 0 .*{LAYER}\.weight")
    return run.publish()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arm", ["lora", "full"])
def test_every_handoff_fault_stops_the_run_at_its_step(tiny_model_with_tokenizer, arm, dtype):
    path = tiny_model_with_tokenizer
    run = Run(make_learner(path, arm, dtype), make_sampler(path, arm, dtype))
    sampler, learner = run.sampler, run.learner
    try:
        run.publish()  # v0: calibrates the probe, checks the base
        for k, lr in enumerate(LRS[arm]):
            if arm == "full":
                stats = fullft_faults(run, lr, k)
                assert stats["fingerprint_ok"] == 1.0 and stats["fingerprint_tensors"] > 0 and stats["verify_s"] > 0
                continue
            # 1. the adapter load skipped: the engine keeps the previous policy
            optimizer_step(learner, lr, seed=10 * k)
            run.fault("load_adapter", lambda write, version: None, "worker 0 .*lora_")
            run.publish()
            # 2. the previous version served: the engine loads the policy before this step
            previous = Path(sampler._lora.lora_path)  # type: ignore[union-attr]  # the live (previous) version's files
            kept = previous.with_name("kept")
            shutil.copytree(previous, kept)
            optimizer_step(learner, lr, seed=10 * k + 1)
            stale = lambda write, version, kept=kept: Sampler.load_adapter(sampler, lambda p: shutil.copytree(kept, p), version)  # noqa: E731
            run.fault("load_adapter", stale, "worker 0 .*lora_")
            shutil.rmtree(kept)
            run.publish()
            # 3. one tensor of one layer left old
            key = f"{lora.KEY_PREFIX}{LAYER}.lora_B.weight"
            old_b = lora.lora_state_dict(learner.model)[key].clone()
            optimizer_step(learner, lr, seed=10 * k + 2)

            def partial(p: Path, key: str = key, old_b: torch.Tensor = old_b) -> None:
                learner.write_adapter(p)
                tensors = load_file(p / lora.WEIGHTS_FILE)
                tensors[key] = old_b
                save_file(tensors, p / lora.WEIGHTS_FILE, metadata={"format": "pt"})

            one_old = lambda write, version: Sampler.load_adapter(sampler, partial, version)  # noqa: E731
            run.fault("load_adapter", one_old, rf"worker 0 .*{LAYER}\[0\]\.lora_B")
            stats = run.publish()
            assert stats["fingerprint_ok"] == 1.0 and stats["fingerprint_tensors"] > 0 and stats["verify_s"] > 0
    finally:
        close(sampler)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampled_fullft_read_back_catches_every_stale_or_partial_handoff(tiny_model_with_tokenizer, dtype):
    """The run's default between whole read-backs (config fingerprint_fraction, 1/16): each packed
    GEMM read back at that share of its input columns, drawn afresh. A skipped load, the previous version
    and one tensor of one layer left old still stop the run at their step, at both ends of the
    FullFT learning-rate range; correct handoffs pass and report the sampled fraction."""
    path = tiny_model_with_tokenizer
    run = Run(make_learner(path, "full", dtype), make_sampler(path, "full", dtype))
    fraction = RLConfig().fingerprint_fraction
    run.probe.fingerprint_fraction, run.probe.fingerprint_full_every = fraction, 1000
    sampler = run.sampler
    try:
        assert run.publish()["fingerprint_fraction"] == 1.0  # the run's first handoff: everything
        for k, lr in enumerate(LRS["full"]):
            stats = fullft_faults(run, lr, k, skip_match="worker 0 .*weight .*input columns sampled")
            assert stats["fingerprint_ok"] == 1.0 and stats["fingerprint_fraction"] == fraction
        # the embedding is sampled too (by columns): left old, it is caught and named
        served = {t.name: t for t in sampler.served_prints(seed=5, fraction=fraction)[0].tensors}
        assert 0 < served["model.embed_tokens.weight"].columns[2] < served["model.embed_tokens.weight"].columns[1]
        name = "model.embed_tokens.weight"
        old = dict(run.learner.weights())[name].clone()
        optimizer_step(run.learner, LRS["full"][0], seed=99)
        embedding_old = lambda weights, version: Sampler.load_weights(sampler, old_tensor_in(weights, name, old), version)  # noqa: E731
        run.fault("load_weights", embedding_old, r"worker 0 .*embed_tokens\.weight .*input columns sampled")
        assert run.publish()["fingerprint_ok"] == 1.0
    finally:
        close(sampler)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_tensor_parallel_worker_left_old(tiny_model_with_tokenizer, dtype, monkeypatch):
    """CPU tensor parallelism 2 (the engine in its own process, FullFT weights through a file): the
    handoff reaches worker 0 only; worker 1 keeps one element of one layer old. Named: worker 1."""
    path = tiny_model_with_tokenizer
    place = plan_placement("colocate", 2, 1, 0, 1, "cpu", 0, cpu_cores=(0, 1))
    for key in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_WORKER_MULTIPROC_METHOD"):
        monkeypatch.setenv(key, "")  # the Sampler sets them for this engine; restored for the next tests
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", place.cpu_threads_bind)
    sampler = make_sampler(path, "full", dtype, tensor_parallel_size=2, in_process=place.engine_in_process, cpu_threads_bind=place.cpu_threads_bind)
    run = Run(make_learner(path, "full", dtype), sampler)
    try:
        stats = run.publish()
        assert stats["fingerprint_tensors"] > 0
        for k, lr in enumerate(LRS["full"]):
            optimizer_step(run.learner, lr, seed=k)
            run.publish()  # both workers verified
            optimizer_step(run.learner, lr, seed=k + 100)

            def one_worker_old(weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
                Sampler.load_weights(sampler, weights, version)
                assert sampler.llm.collective_rpc("overwrite_for_test", args=(LAYER, 1)) == [False, True]

            run.fault("load_weights", one_worker_old, rf"worker 1 \(tensor-parallel rank 1/2\) serves {LAYER}\.weight")
            run.publish()
    finally:
        close(sampler)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_tenant_served_another_tenants_adapter(tiny_model_with_tokenizer, dtype):
    """rl-multi: two tenants on one engine; tenant a's handoff loads tenant b's adapter."""
    path = tiny_model_with_tokenizer
    specs = [LearnerSpec(model_path=path, lora=lora.LoRASpec(rank=1), lr=1e-3, dtype=dtype, seed=seed) for seed in (0, 1)]
    learners = shared_base_learners(specs)
    sampler = make_sampler(path, "lora", dtype, max_loras=2)
    probes = [make_probe(sampler.tokenizer, dtype) for _ in learners]
    slots = [sampler.slot(name) for name in ("a", "b")]
    try:
        for version in range(2):
            for learner, slot, probe in zip(learners, slots, probes):
                publish(learner, slot, version, probe)
            for k, learner in enumerate(learners):
                optimizer_step(learner, 1e-3, seed=10 * version + k)
        original = sampler.load_adapter

        def swapped(write: Callable[[Path], object], version: int, tenant: str = DEFAULT_TENANT) -> None:
            original(learners[1].write_adapter if tenant == "a" else write, version, tenant)

        sampler.load_adapter = swapped  # type: ignore[method-assign]
        with pytest.raises(HandoffError, match=r"policy v2: the engine does not serve the learner's adapter: worker 0 .*lora_A"):
            publish(learners[0], slots[0], 2, probes[0])
    finally:
        close(sampler)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arm", ["lora", "full"])
def test_resume_on_an_engine_started_from_another_checkpoint(tiny_model_with_tokenizer, tmp_path, arm, dtype):
    """A run resumes at step 3; its engine was started from another checkpoint than the learner's
    (FullFT: and the first push is lost; LoRA: the base differs, the adapter itself arrives)."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_with_tokenizer
    other = tmp_path / "other"
    shutil.copytree(path, other)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():  # a few realistic FullFT steps away from the learner's weights
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).sign() * 3e-5)
    model.save_pretrained(other)
    sampler = make_sampler(str(other), arm, dtype)
    run = Run(make_learner(path, arm, dtype), sampler, version=3)
    try:
        if arm == "full":
            run.fault("load_weights", lambda weights, version: None, "worker 0 .*weight")
        else:
            with pytest.raises(HandoffError, match=r"policy v3: the engine does not serve the learner's base weights: worker 0"):
                run.publish()
    finally:
        close(sampler)
