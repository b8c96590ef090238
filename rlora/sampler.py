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
- FullFT handoff: the engine repacks linear weights at load, so copying into its parameters does
  nothing; `reload_weights` runs vLLM's own loader on the new tensors, then the prefix cache is
  reset.
- No per-request `seed`: on CPU it kills the engine when chunked prefill splits a prompt. The
  engine-wide `seed` makes a run's sampling reproducible from a fresh start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rlora.types import Prompt, Sample

# vLLM's accepted max_lora_rank values (2 and 4 are rejected by this vLLM).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def fit_max_lora_rank(rank: int) -> int:
    for allowed in LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {LORA_RANKS[-1]}")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA device")
    return device


def handoff_root() -> Path:
    """Adapters travel through RAM-backed /dev/shm where there is one."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="rlora-handoff-", dir=base))


@dataclass(frozen=True)
class EngineSpec:
    model_path: str
    device: str = "cpu"  # cpu | cuda (the visible CUDA devices; placement is the launcher's job)
    dtype: str = "bfloat16"
    lora_rank: int | None = 1  # None: FullFT, no LoRA in the engine
    kv_cache_gib: float = 1.0  # CPU only
    gpu_memory_utilization: float = 0.35  # CUDA only
    max_model_len: int = 1024
    max_num_seqs: int = 256
    seed: int = 0


class Sampler:
    """Samples groups of completions from the current policy and accepts new policies."""

    def __init__(self, spec: EngineSpec) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if spec.device == "cpu":
            # On CPU the default memory fraction refuses to start; size the KV cache explicitly.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(spec.kv_cache_gib)))
        from vllm import LLM

        kwargs: dict[str, object] = dict(
            model=spec.model_path,
            dtype=spec.dtype,
            seed=spec.seed,
            max_model_len=spec.max_model_len,
            max_num_seqs=spec.max_num_seqs,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
        )
        if spec.device == "cpu":
            # eager: 3 s start instead of 50-75 s of compilation; block 32: 2x prefill on CPU
            kwargs.update(enforce_eager=True, block_size=32)
            if spec.kv_cache_gib < 1:
                kwargs["kv_cache_memory_bytes"] = int(spec.kv_cache_gib * 2**30)
        else:
            kwargs.update(gpu_memory_utilization=spec.gpu_memory_utilization)
        if spec.lora_rank is not None:
            kwargs.update(enable_lora=True, max_lora_rank=fit_max_lora_rank(spec.lora_rank), max_loras=1)
        start = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.start_s = time.perf_counter() - start
        self.spec = spec
        self.tokenizer = self.llm.get_tokenizer()
        self.version = -1
        self._lora = None  # the LoRARequest serving the current version
        self._handoff_dir = handoff_root() if spec.lora_rank is not None else None

    # ---------------------------------------------------------------- sampling

    def sample(self, prompts: Sequence[Prompt], group_size: int, max_tokens: int, temperature: float) -> list[list[Sample]]:
        """G completions per prompt, each with its tokens' logprobs under the sampled distribution."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=group_size, temperature=temperature, top_p=1.0, max_tokens=max_tokens, logprobs=0)
        requests = [TokensPrompt(prompt_token_ids=list(p.prompt_ids)) for p in prompts]
        outputs = self.llm.generate(requests, params, lora_request=self._lora, use_tqdm=False)
        groups: list[list[Sample]] = []
        for out in outputs:
            samples = []
            for c in out.outputs:
                ids = tuple(c.token_ids)
                assert c.logprobs is not None and len(c.logprobs) == len(ids), "vLLM returned no per-token logprobs"
                lps = tuple(float(step[tok].logprob) for step, tok in zip(c.logprobs, ids))
                samples.append(Sample(ids, lps, c.text, str(c.finish_reason)))
            groups.append(samples)
        return groups

    def prompt_logprobs(self, token_ids: Sequence[int]) -> list[float]:
        """log p(token_t | tokens_<t) for t >= 1 under the current policy at temperature 1."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(token_ids))], params, lora_request=self._lora, use_tqdm=False)[0]
        assert out.prompt_logprobs is not None
        return [float(step[tok].logprob) for step, tok in zip(out.prompt_logprobs[1:], token_ids[1:])]

    # ---------------------------------------------------------------- handoff

    def load_adapter(self, write_adapter: Callable[[Path], None], version: int) -> None:
        """Serve a new LoRA version: written to a fresh directory, new name, new id, old one removed."""
        from vllm.lora.request import LoRARequest

        assert self._handoff_dir is not None, "engine was built without LoRA (FullFT run)"
        assert version > self.version, f"policy versions must increase: {version} after {self.version}"
        path = self._handoff_dir / f"v{version}"
        write_adapter(path)
        request = LoRARequest(lora_name=f"policy-v{version}", lora_int_id=version + 1, lora_path=str(path))
        engine = self.llm.llm_engine
        if not engine.add_lora(request):
            raise RuntimeError(f"vLLM refused adapter version {version} at {path}")
        previous, self._lora, self.version = self._lora, request, version
        if previous is not None:
            engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        loaded = engine.list_loras()
        if loaded != {request.lora_int_id}:
            raise RuntimeError(f"engine holds adapters {sorted(loaded)}, expected only {request.lora_int_id}")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """FullFT: push new weights (checkpoint names) into the running engine."""
        assert self.spec.lora_rank is None, "FullFT handoff on a LoRA engine"
        assert version > self.version, f"policy versions must increase: {version} after {self.version}"
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()  # cached KV was computed by the old weights
        self.version = version

    def close(self) -> None:
        if self._handoff_dir is not None:
            shutil.rmtree(self._handoff_dir, ignore_errors=True)
        del self.llm

