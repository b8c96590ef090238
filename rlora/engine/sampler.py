"""The sampler: one running vLLM engine that serves the current policy.

Design:
- The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): start-up takes seconds
  instead of a minute on CPU, and FullFT weights reach it without serialisation. The same code
  runs CUDA vLLM on a GPU; only the memory knobs differ (`kv_cache_gib` on CPU,
  `gpu_memory_utilization` on GPU).
- Logprobs: the engine is built with `logprobs_mode="processed_logprobs"`, so each sampled
  token's logprob is taken under the distribution actually sampled from (logits / temperature).
  vLLM's default returns raw logprobs, which differ from the sampling distribution whenever
  T != 1 and would bias every importance ratio. The learner divides its logits by the same T.
- LoRA handoff: every policy version is a new adapter directory, a new adapter name and a new
  integer id, added with `add_lora` before the old one is removed. Reusing a name or path would
  let vLLM's prefix cache (keyed by them) serve KV computed by the previous adapter.
  `max_lora_rank` is fitted to the run's rank (rank 1 served as rank 1), since CPU cost grows
  with `max_lora_rank`, not with the adapter's own rank.
- Tenants (`rlora rl-multi`): one engine can serve K runs' adapters at once (`max_loras=K`,
  `max_lora_rank` fitted to the largest rank). Each tenant has its own versions, names
  (`<tenant>-v<version>`), paths and ids (one counter for the whole engine), so no two adapters
  ever share a prefix-cache key; `sample` takes one tenant per prompt and sends every prompt in
  ONE `generate` call with a per-request list of LoRARequests. The engine keeps room for one
  adapter more than it has tenants (`max_cpu_loras = max_loras + 1`): a new version is added
  before the old one is removed, and a full cache would evict its least recently used adapter,
  which may be another tenant's live one. Mixed batches are only correct with rlora's CPU LoRA
  ops (`rlora.engine.vllm_lora_ops`; stock vLLM applies the last slot's adapter to base requests).
  `slot(tenant)` gives one tenant the single-run handoff API, which is what `rlora.rl.loop.publish`
  calls. A single run is the tenant `DEFAULT_TENANT`, and the API without tenants is unchanged.
- FullFT handoff: the engine repacks linear weights at load, so copying into its parameters does
  nothing; `reload_weights` runs vLLM's own loader on the new tensors, then the prefix cache is
  reset.
- Placement (`rlora.train.placement` decides, EngineSpec carries it): `device_ids` picks the engine's
  GPUs, `tensor_parallel_size` shards it; with several learner processes or tensor parallelism
  the engine core runs in its own spawned process (`in_process=False`), and FullFT weights then
  cross as a safetensors file (`reload_weights(weights_path=...)`). `asleep()` puts a
  sleep-mode engine to sleep around the learner's step.
- No per-request `seed`: on CPU it kills the engine when chunked prefill splits a prompt. The
  engine-wide `seed` makes a run's sampling reproducible from a fresh start.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlora.engine.fingerprint import WorkerPrints, columns_count, fingerprint, sampled_columns, tensor_seed
from rlora.rl.types import Prompt, PushedWeights, Sample

if TYPE_CHECKING:
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.request import LoRARequest

# vLLM's accepted max_lora_rank values (2 and 4 are rejected by this vLLM).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_TENANT = "policy"  # the one tenant of a single run


def fit_max_lora_rank(rank: int) -> int:
    for allowed in LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {LORA_RANKS[-1]}")


ADAPTER_BUDGET = 2**28  # room asked of /dev/shm for the adapters of a run (rank 32 at 8B: 168 MB in bf16)
SHM_SLACK = 2**26


def handoff_root(needed: int = ADAPTER_BUDGET, shm: Path = Path("/dev/shm")) -> Path:
    """A fresh folder for file handoffs: RAM-backed /dev/shm when it has room for `needed` bytes, else the disk.

    Docker gives /dev/shm 64 MB unless told otherwise (`--shm-size`): a FullFT handoff written
    there would fail half-way (SIGBUS or ENOSPC), so the free space is checked first and the
    fallback says so. A disk without room either is an error naming both folders.
    """
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= needed + SHM_SLACK:
        return Path(tempfile.mkdtemp(prefix="rlora-handoff-", dir=shm))
    disk = Path(tempfile.gettempdir())
    free = shutil.disk_usage(disk).free
    if free < needed + SHM_SLACK:
        raise RuntimeError(f"handoff of {needed / 2**30:.1f} GiB: neither {shm} nor {disk} has room ({free / 2**30:.1f} GiB free); set TMPDIR to a larger disk")
    shm_free = shutil.disk_usage(shm).free if shm.is_dir() else 0
    print(
        f"rlora: {shm} has {shm_free / 2**30:.2f} GiB free, the handoff needs {needed / 2**30:.2f} GiB: writing to {disk} instead "
        "(slower; a container wants --shm-size, e.g. docker run --shm-size=32g)",
        file=sys.stderr,
    )
    return Path(tempfile.mkdtemp(prefix="rlora-handoff-", dir=disk))


def save_safetensors(weights: Iterable[tuple[str, torch.Tensor]], path: Path, dtype: torch.dtype) -> None:
    """Weights in checkpoint names as one safetensors file, in the engine's dtype (half the bytes in bf16),
    cast on their device before the copy to host memory (half the PCIe traffic, no float32 host copy)."""
    from safetensors.torch import save_file

    save_file({name: t.detach().to(dtype).cpu().contiguous() for name, t in weights}, str(path))


def empty_cuda_cache() -> None:
    """Return this process's cached, unused CUDA blocks to the driver (nothing without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def quiet_vllm() -> None:
    """vLLM logs at WARNING unless the user chose a level (`VLLM_LOGGING_LEVEL`), before vLLM is imported.

    At INFO a CPU run prints hundreds of lines (per-kernel registrations, engine arguments, cache
    sizes) that bury the progress bar and real problems. Engine processes inherit the variable.
    """
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


# vLLM warnings that say nothing about the run (each checked against vLLM 0.32's source):
# - an in-process CPU engine replaces torch.set_num_threads by a warning, repeated whenever a
#   library calls it, although the learner's thread count was set before the engine started;
# - every new adapter warns that per-LoRA tokenizers are deprecated (rlora's adapters have none).
HARMLESS_VLLM_WARNINGS = (
    "doesn't allow to use `torch.set_num_threads` after the thread binding",
    "deprecated support for supporting different tokenizers for different LoRAs",
)


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(note in message for note in HARMLESS_VLLM_WARNINGS)


def drop_harmless_vllm_warnings() -> None:
    """After vLLM is imported: its handlers skip HARMLESS_VLLM_WARNINGS (once per handler)."""
    for handler in logging.getLogger("vllm").handlers:
        if not any(isinstance(f, _DropHarmless) for f in handler.filters):
            handler.addFilter(_DropHarmless())


class _DropReloadNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("Attempted to load weight") or message == "%s: Failed to load weights")


# The loggers whose reload notes `expected_reload_notes_unlogged` drops during a FullFT handoff.
RELOAD_LOGGERS = ("vllm.model_executor.models.utils", "vllm.model_executor.model_loader.reload.layerwise")


@contextlib.contextmanager
def expected_reload_notes_unlogged() -> Iterator[None]:
    """Around a FullFT handoff: drop vLLM's expected per-step notes of its weight reload.

    - "Attempted to load weight ...": handing over float32 master weights lets vLLM cast while it
      copies (measured 0.30 s per handoff, against 0.35 s when we cast first), but it warns once
      per tensor (~270 lines a step).
    - "<layer>: Failed to load weights": the reload names the layers no handed tensor fills:
      RotaryEmbedding (its cos/sin cache is computed, never loaded) and, for tied embeddings,
      ParallelLMHead, which `retie_word_embeddings` points at the new embedding right after.
    Only those messages of those loggers are dropped, and only during the call.
    """
    drop = _DropReloadNotes()
    loggers = [logging.getLogger(name) for name in RELOAD_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def checkpoint_names(module: str, param: str, packed: dict[str, list[str]], tied_head: bool) -> list[str]:
    """The checkpoint tensors an engine parameter holds: `model.layers.0.self_attn.qkv_proj` + `weight`
    holds q_proj, k_proj and v_proj's weights (the model's `packed_modules_mapping`); a tied output
    layer holds the embedding; `<layer>.base_layer` is the layer under a LoRA wrapper."""
    if tied_head:
        return [f"model.embed_tokens.{param}"]
    prefix, _, leaf = module.replace(".base_layer", "").rpartition(".")  # a LoRA engine wraps each layer
    return [f"{prefix}.{part}.{param}" if prefix else f"{part}.{param}" for part in packed.get(leaf, [leaf])]


class WorkerExtension:
    """Methods vLLM mixes into every engine worker (`worker_extension_cls`), reached by name with
    `llm.collective_rpc("<method>")` whether the engine runs in this process or in its own."""

    def retie_word_embeddings(self) -> bool:
        """After `reload_weights`: point a tied lm_head at the new embedding.

        vLLM ties the output layer to the input embedding by sharing one Parameter at load time;
        `reload_weights` gives the embedding a new Parameter and skips the tied `lm_head.weight`,
        so the output layer (and, on CPU, its packed GEMM copy) kept the old embedding, and a
        FullFT policy's embedding updates never reached the logits (0.45 nats/token on the probe
        after an embedding-only change, float32; tests/test_rl_engine.py checks it).
        """
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        config = getattr(model, "config", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if not getattr(config, "tie_word_embeddings", False) or embed is None or not hasattr(model, "lm_head"):
            return False
        model.lm_head.weight = embed.weight
        # On CPU the output layer multiplies with a packed copy made at load time: pack it again.
        quant_method = getattr(model.lm_head, "quant_method", None)
        if quant_method is not None:
            quant_method.process_weights_after_loading(model.lm_head)
        return True

    # ---------------------------------------------------------------- verification (rlora.rl.handoff)

    def _worker_id(self) -> dict[str, int]:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return {"rank": int(self.rank), "tp_rank": get_tensor_model_parallel_rank(), "tp_size": get_tensor_model_parallel_world_size()}  # type: ignore[attr-defined]

    def _lora_manager(self) -> LoRAModelManager:
        return self.model_runner.lora_manager._adapter_manager  # type: ignore[attr-defined]

    def served_lora_prints(self, lora_id: int) -> dict[str, object]:
        """The fingerprints of the LoRA weights this worker serves for adapter `lora_id`.

        Read from the stacked slot buffers the forward pass multiplies with (what `set_lora`
        copied there when the adapter was activated, after vLLM's cast and `lora_b *= scaling`),
        one entry per (layer, packed sub-slice, A or B), each naming the PEFT module it comes
        from. `slot` is -1 when the adapter holds no slot (never activated, or evicted); `slots`
        is every slot's adapter id.
        """
        manager = self._lora_manager()
        slots = [-1 if i is None else int(i) for i in manager.lora_index_to_id]
        out: dict[str, object] = {**self._worker_id(), "slots": slots, "slot": slots.index(lora_id) if lora_id in slots else -1, "tensors": []}
        if lora_id not in slots:
            return out
        index = slots.index(lora_id)
        packed = dict(getattr(manager, "packed_modules_mapping", {}) or {})
        rows: list[list[object]] = []
        for name, module in manager.modules.items():
            a_stacked, b_stacked = module.lora_a_stacked, module.lora_b_stacked
            a_stacked = (a_stacked,) if isinstance(a_stacked, torch.Tensor) else tuple(a_stacked)
            b_stacked = (b_stacked,) if isinstance(b_stacked, torch.Tensor) else tuple(b_stacked)
            prefix, _, leaf = name.rpartition(".")
            parts = list(packed.get(leaf, [leaf]))
            for i, (a, b) in enumerate(zip(a_stacked, b_stacked)):
                source = f"{prefix}.{parts[i]}" if len(parts) == len(a_stacked) and prefix else (f"{prefix}.{leaf}" if prefix else leaf)
                for part, stacked in (("lora_A", a), ("lora_B", b)):
                    fp = fingerprint(stacked[index])
                    rows.append([f"{name}[{i}].{part}", [f"{source}.{part}"], fp.hash, fp.nonzero])
        out["tensors"] = rows
        return out

    def served_weight_prints(self, max_chunk_elems: int = 1 << 25, seed: int = 0, fraction: float = 1.0) -> dict[str, object]:
        """The fingerprints of every weight this worker serves, after vLLM's loading and repacking.

        On CPU vLLM packs each linear layer's weight into an opaque GEMM handle (`layer.cpu_linear`,
        oneDNN) and leaves an empty `layer.weight`; the served matrix is read back through that
        same kernel by multiplying an identity matrix (whole, or in row chunks whose output holds at
        most `max_chunk_elems` elements; larger GEMMs run faster: 52 against 23 GFLOP/s for
        down_proj at 1536 rows against 256, float32 on 2 AVX2 cores): each output is
        one weight times 1 plus exact zeros, so the read-back is bit-exact (W^T). The output layer
        is read back through its own packed copy too (the one the logits use; a tied one must hold
        the embedding). Every other parameter (embeddings, norms, and weights on GPU) is
        fingerprinted as it is. Each entry names its checkpoint tensors: a packed qkv_proj holds
        q_proj, k_proj and v_proj (the model's `packed_modules_mapping`).

        With `fraction` < 1 a read-back GEMM multiplies only the identity rows of the input
        columns `sampled_columns(seed ^ crc32(name), K, columns_count(K, fraction))` (a sampled
        check at a fraction of the GEMM's cost; the entry reports the columns it read), and so is
        every other 2-D tensor on CPU (the embedding) at columns drawn the same way; 1-D tensors
        (norms) are fingerprinted whole.
        """
        from vllm.model_executor.layers.linear import LinearBase
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
        tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
        rows: list[list[object]] = []
        seen: set[int] = set()
        for mod_name, module in model.named_modules():
            is_head = isinstance(module, ParallelLMHead)
            gemm = getattr(module, "cpu_linear", None)
            reads_back = gemm is not None and (is_head or isinstance(module, LinearBase))
            if reads_back:
                weight = module.weight
                K = int(weight.shape[1]) if weight.numel() else int(module.input_size_per_partition)
                total = fingerprint(weight.new_zeros(0))
                N = int(module.output_size_per_partition) if isinstance(module, LinearBase) else int(weight.shape[0])
                name = f"{mod_name}.weight (served GEMM)"
                columns: list[int] = []
                cols = torch.arange(K)
                if fraction < 1:
                    columns = [tensor_seed(seed, name), K, columns_count(K, fraction)]
                    cols = sampled_columns(*columns)
                chunk = max(256, min(K, max_chunk_elems // max(N, 1)))
                for k0 in range(0, len(cols), chunk):
                    rows_c = min(chunk, len(cols) - k0)
                    eye = weight.new_zeros(rows_c, K)
                    eye[torch.arange(rows_c), cols[k0 : k0 + rows_c]] = 1
                    total = total + fingerprint(module.cpu_linear(eye, weight, None))
                rows.append([name, checkpoint_names(mod_name, "weight", packed, is_head and tied), total.hash, total.nonzero, columns])
                seen.add(id(weight))
            for param_name, param in module.named_parameters(recurse=False):
                if id(param) in seen or param.numel() == 0 or (reads_back and param_name == "weight"):
                    continue
                seen.add(id(param))
                name, sources = f"{mod_name}.{param_name}", checkpoint_names(mod_name, param_name, packed, is_head and tied)
                if fraction < 1 and param.ndim == 2 and param.device.type == "cpu":
                    # the embedding (a fifth of SmolLM2-135M): sampled like the GEMMs, else it alone
                    # was 60% of the sampled check's hashing
                    K = int(param.shape[1])
                    columns = [tensor_seed(seed, name), K, columns_count(K, fraction)]
                    fp = fingerprint(param.data[:, sampled_columns(*columns)])
                    rows.append([name, sources, fp.hash, fp.nonzero, columns])
                    continue
                fp = fingerprint(param.data)
                rows.append([name, sources, fp.hash, fp.nonzero])
        return {**self._worker_id(), "tensors": rows}

    def overwrite_for_test(self, target: str, rank: int, lora_id: int = -1) -> bool:
        """Tests only (fault injection): on the worker of global `rank` alone, change one served tensor.

        `target` names a LoRA layer (its slot for adapter `lora_id`: B of the first sub-slice is
        negated) or, with `lora_id` -1, a linear layer of a FullFT engine (its packed GEMM is
        rebuilt from a weight with one element changed). True when this worker changed something.
        """
        if int(self.rank) != rank:  # type: ignore[attr-defined]
            return False
        if lora_id >= 0:
            manager = self._lora_manager()
            index = list(manager.lora_index_to_id).index(lora_id)
            b = manager.modules[target].lora_b_stacked
            b = b if isinstance(b, torch.Tensor) else b[0]
            b[index].mul_(-1)
            return True
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        module = model.get_submodule(target)
        weight = module.weight
        K = int(weight.shape[1]) if weight.numel() else int(module.input_size_per_partition)
        served = module.cpu_linear(torch.eye(K, dtype=weight.dtype), weight, None).t().contiguous()  # (N, K)
        served[0, 0] += 1
        module.weight.data = served  # then packed again, exactly as vLLM packs a loaded weight
        module.quant_method.process_weights_after_loading(module)
        return True


def placement_kwargs(spec: EngineSpec) -> dict[str, object]:
    """vLLM's arguments for where the engine runs: its GPUs, tensor parallelism, sleep mode."""
    kwargs: dict[str, object] = {"tensor_parallel_size": spec.tensor_parallel_size}
    if spec.device_ids:  # physical ids, or indices into CUDA_VISIBLE_DEVICES when it is set
        kwargs["device_ids"] = list(spec.device_ids)
    if spec.sleep_mode:
        kwargs["enable_sleep_mode"] = True
    return kwargs


def engine_kwargs(spec: EngineSpec) -> dict[str, object]:
    """vLLM's `LLM(...)` arguments (its EngineArgs fields) for `spec`; a pure function, so a CPU test
    can build vLLM's argument and LoRA config objects for a CUDA spec and catch API drift."""
    kwargs: dict[str, object] = dict(
        model=spec.model_path,
        dtype=spec.dtype,
        seed=spec.seed,
        max_model_len=spec.max_model_len,
        max_num_seqs=spec.max_num_seqs,
        logprobs_mode="processed_logprobs",
        enable_prefix_caching=True,
        worker_extension_cls=f"{WorkerExtension.__module__}.{WorkerExtension.__qualname__}",
    )
    if spec.device == "cpu":
        # eager: 3 s start instead of 50-75 s of compilation; block 32: 2x prefill on CPU
        kwargs.update(enforce_eager=True, block_size=32)
        if spec.kv_cache_gib < 1:
            kwargs["kv_cache_memory_bytes"] = int(spec.kv_cache_gib * 2**30)
    else:
        kwargs.update(gpu_memory_utilization=spec.gpu_memory_utilization)
    if spec.lora_rank is not None:
        kwargs.update(lora_kwargs(spec))
    kwargs.update(placement_kwargs(spec))
    if spec.weight_transfer:
        kwargs["weight_transfer_config"] = {"backend": spec.weight_transfer}
    return kwargs


def lora_kwargs(spec: EngineSpec) -> dict[str, object]:
    """The LoRA part of `engine_kwargs` (vLLM's LoRAConfig fields, plus enable_lora)."""
    assert spec.lora_rank is not None
    return dict(enable_lora=True, max_lora_rank=fit_max_lora_rank(spec.lora_rank), max_loras=spec.max_loras, max_cpu_loras=spec.max_loras + 1)


def score_params() -> object:
    """Scoring a sequence: one throwaway token, each prompt token's logprob at temperature 1."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)


def prompt_scores(out: object, token_ids: Sequence[int]) -> list[float]:
    """log p(token_t | tokens_<t) for t >= 1 from a scoring request's output."""
    prompt_logprobs = out.prompt_logprobs  # type: ignore[attr-defined]
    assert prompt_logprobs is not None, "vLLM returned no prompt logprobs"
    return [float(step[tok].logprob) for step, tok in zip(prompt_logprobs[1:], token_ids[1:])]


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    model_path: str
    device: str = "cpu"  # cpu | cuda (which GPUs: device_ids below)
    dtype: str = "bfloat16"
    lora_rank: int | None = 1  # None: FullFT, no LoRA in the engine; with tenants, the largest rank
    kv_cache_gib: float = 1.0  # CPU only
    gpu_memory_utilization: float = 0.35  # CUDA only
    max_model_len: int = 1024
    max_num_seqs: int = 256
    seed: int = 0
    max_loras: int = 1  # adapters one batch may mix: the number of tenants
    # where the engine runs (chosen by rlora.train.placement)
    device_ids: tuple[int, ...] = ()  # CUDA: the engine's GPUs (vLLM `device_ids`); () = the first visible ones
    tensor_parallel_size: int = 1
    in_process: bool = True  # False: vLLM's engine core runs in its own (spawned) process
    sleep_mode: bool = False  # CUDA only: the engine can sleep while the learner runs (`Sampler.asleep`)
    cpu_threads_bind: str = ""  # CPU tensor parallelism: VLLM_CPU_OMP_THREADS_BIND ("0|1"); "" = vLLM's default
    weight_transfer: str = ""  # ipc | nccl: the engine accepts FullFT weights in GPU memory (rlora.engine.weight_sync); "" = none


class Sampler:
    """Samples groups of completions from the current policy and accepts new policies."""

    def __init__(self, spec: EngineSpec) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if spec.in_process else "1"
        if not spec.in_process:  # spawn, never fork: a forked engine inherits the learners' process group
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        if spec.device == "cpu":
            # On CPU the default memory fraction refuses to start; size the KV cache explicitly.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(spec.kv_cache_gib)))
            if spec.cpu_threads_bind:  # vLLM's automatic binding wants one NUMA node per CPU worker
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", spec.cpu_threads_bind)
        quiet_vllm()
        from vllm import LLM

        drop_harmless_vllm_warnings()

        start = time.perf_counter()
        self.llm = LLM(**engine_kwargs(spec))
        drop_harmless_vllm_warnings()  # again: building the engine may set up vLLM's handler anew
        self.start_s = time.perf_counter() - start
        self.spec = spec
        self.tokenizer = self.llm.get_tokenizer()
        self.versions: dict[str, int] = {}  # the policy version each tenant serves (FullFT: DEFAULT_TENANT)
        self._loras: dict[str, LoRARequest] = {}  # the adapter serving each tenant's current version
        self._lora_ids = itertools.count(1)  # vLLM ids are unique across tenants and versions
        self._handoff_dir = handoff_root() if spec.lora_rank is not None else None
        self._base_prints: list[WorkerPrints] | None = None  # a LoRA engine's frozen base, read once
        self.handoff_bytes = 0  # bytes of the last handoff: adapter files, or full weights in the engine's dtype

    @property
    def version(self) -> int:
        """The single run's policy version (-1 before the first handoff)."""
        return self.versions.get(DEFAULT_TENANT, -1)

    @property
    def _lora(self) -> LoRARequest | None:
        """The single run's live adapter (benchmarks read its path)."""
        return self._loras.get(DEFAULT_TENANT)

    def slot(self, tenant: str) -> AdapterSlot:
        """One tenant's view of this engine, with the handoff API of a single-run Sampler."""
        return AdapterSlot(self, tenant)

    def _requests(self, tenants: Sequence[str | None]) -> list[LoRARequest | None]:
        """Each tenant's live adapter; None (the base model) for a None tenant."""
        missing = sorted({t for t in tenants if t is not None and t not in self._loras})
        assert not missing, f"tenants {missing} have no adapter in the engine (loaded: {sorted(self._loras)})"
        return [None if t is None else self._loras[t] for t in tenants]

    # ---------------------------------------------------------------- sampling

    def sample(
        self, prompts: Sequence[Prompt], group_size: int, max_tokens: int, temperature: float, tenants: Sequence[str | None] | None = None
    ) -> list[list[Sample]]:
        """G completions per prompt, each with its tokens' logprobs under the sampled distribution.

        `tenants`: whose adapter serves each prompt (None: the base model); all prompts go to the
        engine in one call. Without it every prompt gets the single run's policy.
        """
        return self.sample_scoring(prompts, group_size, max_tokens, temperature, tenants=tenants)[0]

    def sample_scoring(
        self,
        prompts: Sequence[Prompt],
        group_size: int,
        max_tokens: int,
        temperature: float,
        *,
        score_ids: Sequence[int] | None = None,
        tenants: Sequence[str | None] | None = None,
    ) -> tuple[list[list[Sample]], list[float] | None]:
        """`sample`, and with `score_ids` that sequence scored as `prompt_logprobs` would score it, by
        the same policy in the same engine call (one more request: the handoff probe of FullFT runs)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        assert tenants is None or len(tenants) == len(prompts), f"{len(tenants or ())} tenants for {len(prompts)} prompts"
        assert score_ids is None or tenants is None, "a scored sequence goes with the single run's policy"
        # one SamplingParams per distinct stop list (a base model's prompt format stops at its next "Question:")
        by_stop = {
            stop: SamplingParams(n=group_size, temperature=temperature, top_p=1.0, max_tokens=max_tokens, logprobs=0, stop=list(stop) or None)
            for stop in {p.stop for p in prompts}
        }
        params = [by_stop[p.stop] for p in prompts]
        requests = [TokensPrompt(prompt_token_ids=list(p.prompt_ids)) for p in prompts]
        if score_ids is not None:
            params.append(score_params())
            requests.append(TokensPrompt(prompt_token_ids=list(score_ids)))
        lora = self._lora if tenants is None else self._requests(tenants)
        outputs = self.llm.generate(requests, params, lora_request=lora, use_tqdm=False)
        scored = prompt_scores(outputs.pop(), score_ids) if score_ids is not None else None
        groups: list[list[Sample]] = []
        for out in outputs:
            samples = []
            for c in out.outputs:
                ids = tuple(c.token_ids)
                assert c.logprobs is not None and len(c.logprobs) == len(ids), "vLLM returned no per-token logprobs"
                lps = tuple(float(step[tok].logprob) for step, tok in zip(c.logprobs, ids))
                samples.append(Sample(completion_ids=ids, sampler_logprobs=lps, text=c.text, finish_reason=str(c.finish_reason)))
            groups.append(samples)
        return groups, scored

    def prompt_logprobs(self, token_ids: Sequence[int], tenant: str | None = DEFAULT_TENANT) -> list[float]:
        """log p(token_t | tokens_<t) for t >= 1 under a tenant's current policy at temperature 1.

        A tenant without an adapter yet (or None) is scored by the base model.
        """
        from vllm.inputs import TokensPrompt

        lora = self._loras.get(tenant) if tenant is not None else None
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(token_ids))], score_params(), lora_request=lora, use_tqdm=False)[0]
        return prompt_scores(out, token_ids)

    # ---------------------------------------------------------------- handoff

    def load_adapter(self, write_adapter: Callable[[Path], object], version: int, tenant: str = DEFAULT_TENANT) -> None:
        """Serve a tenant's new LoRA version: written to a fresh directory, new name, new id, old one removed."""
        from vllm.lora.request import LoRARequest

        assert self._handoff_dir is not None, "engine was built without LoRA (FullFT run)"
        previous, served = self._loras.get(tenant), self.versions.get(tenant, -1)
        assert version > served, f"policy versions of {tenant!r} must increase: {version} after {served}"
        assert previous is not None or len(self._loras) < self.spec.max_loras, (
            f"engine was built for {self.spec.max_loras} tenants; {tenant!r} would be one more than {sorted(self._loras)}"
        )
        name = f"{tenant}-v{version}"
        path = self._handoff_dir / name
        write_adapter(path)
        self.handoff_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        request = LoRARequest(lora_name=name, lora_int_id=next(self._lora_ids), lora_path=str(path))
        engine = self.llm.llm_engine
        if not engine.add_lora(request):
            raise RuntimeError(f"vLLM refused adapter {name} at {path}")
        self._loras[tenant], self.versions[tenant] = request, version
        if previous is not None:
            engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        loaded, expected = set(engine.list_loras()), {r.lora_int_id for r in self._loras.values()}  # a list from an engine process
        if loaded != expected:
            raise RuntimeError(f"engine holds adapters {sorted(loaded)}, expected exactly {sorted(expected)} (one per tenant)")

    def weight_sync_client(self) -> object:
        """vLLM's weight-sync client for this engine (learners push FullFT weights in GPU memory through it)."""
        from rlora.engine.weight_sync import EngineClient

        assert self.spec.weight_transfer, "the engine was built without weight_transfer"
        return EngineClient(self.llm)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]] | PushedWeights, version: int) -> None:
        """FullFT: push new weights (checkpoint names) into the running engine."""
        assert self.spec.lora_rank is None, "FullFT handoff on a LoRA engine"
        assert version > self.version, f"policy versions must increase: {version} after {self.version}"
        if isinstance(weights, PushedWeights):  # vLLM's weight transfer: the learner ranks send, the workers load
            weights.push()
            self.handoff_bytes = weights.nbytes
            self._after_new_weights(version)
            return
        weights = list(weights)  # references, no copy: their size picks the handoff's folder
        self.handoff_bytes = sum(t.numel() for _, t in weights) * getattr(torch, self.spec.dtype).itemsize
        if self.spec.in_process:
            with expected_reload_notes_unlogged():  # float32 master weights into a bf16 engine: vLLM casts, as intended
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        else:  # tensors do not survive the trip to the engine's process (they arrive as lists): a file does
            path = handoff_root(self.handoff_bytes)
            save_safetensors(weights, path / "model.safetensors", getattr(torch, self.spec.dtype))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
            shutil.rmtree(path, ignore_errors=True)
        self._after_new_weights(version)

    def _after_new_weights(self, version: int) -> None:
        self.llm.collective_rpc("retie_word_embeddings")
        self.llm.reset_prefix_cache()  # cached KV was computed by the old weights
        self.versions[DEFAULT_TENANT] = version

    # ---------------------------------------------------------------- verification

    def served_prints(self, tenant: str = DEFAULT_TENANT, *, seed: int = 0, fraction: float = 1.0) -> list[WorkerPrints]:
        """Per engine worker, the fingerprints of what it serves now: a tenant's adapter (its slot
        buffers), or for FullFT every weight after loading and repacking (`fraction` < 1: a sampled
        read-back of the packed CPU GEMMs, `WorkerExtension.served_weight_prints`). Call after a request
        has used the adapter (the probe): vLLM copies an adapter into its slot when a batch first uses it."""
        if self.spec.lora_rank is None:
            raw = self.llm.collective_rpc("served_weight_prints", kwargs={"seed": seed, "fraction": fraction})
        else:
            assert tenant in self._loras, f"tenant {tenant!r} has no adapter in the engine"
            raw = self.llm.collective_rpc("served_lora_prints", args=(self._loras[tenant].lora_int_id,))
        return [WorkerPrints.from_rpc(r) for r in raw]

    def served_base_prints(self) -> list[WorkerPrints]:
        """Per worker, the fingerprints of the weights under the adapters (a LoRA engine's base never
        changes, so they are read once and kept); for FullFT the same as `served_prints`."""
        if self.spec.lora_rank is None:
            return self.served_prints()
        if self._base_prints is None:
            self._base_prints = [WorkerPrints.from_rpc(r) for r in self.llm.collective_rpc("served_weight_prints")]
        return self._base_prints

    def lora_id(self, tenant: str = DEFAULT_TENANT) -> int:
        """The vLLM adapter id serving a tenant's current version."""
        return self._loras[tenant].lora_int_id

    @property
    def sleep_level(self) -> int:
        """vLLM sleep level: 1 keeps the base weights in host memory (LoRA serves them again);
        2 discards them (FullFT overwrites every weight at the handoff right after waking, so a
        host copy would only cost host memory and a copy back)."""
        return 1 if self.spec.lora_rank is not None else 2

    @contextlib.contextmanager
    def asleep(self, before_wake: Callable[[], object] = empty_cuda_cache) -> Iterator[None]:
        """Around the learner's step: with sleep mode the engine frees its GPU memory meanwhile.

        Sleeping drops the KV cache (and with it the prefix cache); the handoff after waking works
        as on an awake engine. Before waking, `before_wake` runs in this process: the learner's
        CUDA caching allocator still holds the blocks its step freed, and vLLM empties the cache
        only in its own process, so without it `wake_up` can run out of memory on a GPU the
        learner shares. Without sleep mode (`placement` other than sleep) this does nothing.
        """
        if not self.spec.sleep_mode:
            yield
            return
        self.llm.sleep(level=self.sleep_level)
        try:
            yield
        finally:
            before_wake()
            self.llm.wake_up()

    def close(self) -> None:
        if self._handoff_dir is not None:
            shutil.rmtree(self._handoff_dir, ignore_errors=True)
        del self.llm


@dataclass(frozen=True)
class AdapterSlot:
    """One tenant of a shared engine, seen through a single-run Sampler's handoff API (`rlora.rl.loop.publish`)."""

    sampler: Sampler
    tenant: str

    @property
    def version(self) -> int:
        return self.sampler.versions.get(self.tenant, -1)

    def load_adapter(self, write_adapter: Callable[[Path], object], version: int) -> None:
        self.sampler.load_adapter(write_adapter, version, self.tenant)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]] | PushedWeights, version: int) -> None:
        raise TypeError(f"tenant {self.tenant!r}: a shared engine serves LoRA adapters, not full weights")

    def prompt_logprobs(self, token_ids: Sequence[int]) -> list[float]:
        return self.sampler.prompt_logprobs(token_ids, self.tenant)

    @property
    def spec(self) -> EngineSpec:
        return self.sampler.spec

    def served_prints(self, *, seed: int = 0, fraction: float = 1.0) -> list[WorkerPrints]:
        return self.sampler.served_prints(self.tenant, seed=seed, fraction=fraction)

    def served_base_prints(self) -> list[WorkerPrints]:
        return self.sampler.served_base_prints()

    def lora_id(self) -> int:
        return self.sampler.lora_id(self.tenant)
