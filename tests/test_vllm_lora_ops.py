"""rlora.engine.vllm_lora_ops and rlora.engine.vllm_plugin: grouped LoRA ops for vLLM's CPU backend.

Fast tests drive the punica wrapper directly (no engine): random weights in several slots, token
mappings with runs, interleaving and -1 (no LoRA), prefill and decode metadata; every overridden
method is compared with a float64 loop over tokens and, where vLLM's stock CPU ops are correct
(the last slot empty), with stock. Slow tests start real engines on the default model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from vllm import LLM  # noqa: E402
from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from rlora.engine.vllm_lora_ops import GroupedPunicaWrapperCPU, RowGroup, group_rows  # noqa: E402

SLOTS = 3  # adapter slots in the stacked weights
IN, RANK, VOCAB = 24, 4, 40
SLICES = (16, 8, 8)  # a merged q/k/v-like layer


# ---------------------------------------------------------------------------- helpers


def make_wrapper(
    cls: type[PunicaWrapperCPU],
    lora_ids_T: list[int],
    prompt_ids_R: list[int],
    is_prefill: bool,
    slot_ids: list[int | None],
) -> PunicaWrapperCPU:
    """A wrapper whose metadata maps tokens to LoRA ids (0 = none) and ids to slots."""
    wrapper = cls(max_num_batched_tokens=128, max_batches=32, device="cpu")
    mapping = LoRAMapping(tuple(lora_ids_T), tuple(prompt_ids_R), is_prefill=is_prefill)
    wrapper.update_metadata(mapping, slot_ids, len(slot_ids) + 1, VOCAB)
    return wrapper


def slots_of(lora_ids: list[int], slot_ids: list[int | None]) -> list[int]:
    return [slot_ids.index(i) if i > 0 else -1 for i in lora_ids]


def random_stacked(*shape: int, dtype: torch.dtype, empty_slots: tuple[int, ...] = ()) -> torch.Tensor:
    """(SLOTS, 1, *shape) random weights, zero in `empty_slots`."""
    w = torch.randn(SLOTS, 1, *shape, dtype=torch.float64)
    for slot in empty_slots:
        w[slot] = 0
    return w.to(dtype)


def ref_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    a: tuple[torch.Tensor, ...],
    b: tuple[torch.Tensor, ...],
    scale: float,
    slices: tuple[int, ...],
    slots_T: list[int],
) -> torch.Tensor:
    """float64 loop: y[t, slice i] += scale * x[t] @ A_i[s].T @ B_i[s].T for tokens with s >= 0."""
    out = y.double().clone()
    for t, s in enumerate(slots_T):
        if s < 0:
            continue
        col = 0
        for a_i, b_i, width in zip(a, b, slices):
            h = scale * (x[t].double() @ a_i[s, 0].double().T)
            out[t, col : col + width] += h @ b_i[s, 0].double().T
            col += width
    return out


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return (
        {"atol": 1e-9, "rtol": 1e-9} if dtype == torch.float64 else ({"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.15, "rtol": 0.05})
    )


# Token-to-LoRA-id mappings (ids 1..3 live in slots by SLOT_IDS), named by what they exercise.
SLOT_IDS: list[int | None] = [2, 1, 3]  # slot 0 holds id 2, slot 1 id 1, slot 2 id 3
MAPPINGS = {
    "one_adapter": [1] * 10,  # the fast path: one slot, one slice
    "runs_with_base": [0, 0, 1, 1, 1, 2, 2, 0, 0, 0, 3],  # contiguous runs per slot
    "interleaved": [1, 0, 2, 1, 0, 2, 1, 1, 0, 3, 3, 1],  # gathered rows
    "all_base": [0] * 7,  # nothing to do
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------------------- grouping


def test_group_rows_slices_runs_and_gathers_interleaved_rows() -> None:
    assert group_rows(torch.tensor([], dtype=torch.long)) == ()
    assert group_rows(torch.tensor([-1, -1])) == ()
    assert group_rows(torch.tensor([2, 2, 2])) == (RowGroup(2, slice(0, 3)),)
    groups = group_rows(torch.tensor([-1, 0, 0, 1, -1, 1, 2]))
    by_slot = {g.slot: g.rows for g in groups}
    assert by_slot[0] == slice(1, 3)
    assert by_slot[2] == slice(6, 7)
    assert torch.equal(by_slot[1], torch.tensor([3, 5]))


# ---------------------------------------------------------------------------- op-level


@pytest.mark.parametrize("is_prefill", [True, False], ids=["prefill", "decode"])
@pytest.mark.parametrize("mapping", MAPPINGS, ids=list(MAPPINGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_lora_linear_matches_reference(mapping: str, is_prefill: bool, dtype: torch.dtype) -> None:
    ids_T = MAPPINGS[mapping]
    wrapper = make_wrapper(GroupedPunicaWrapperCPU, ids_T, ids_T, is_prefill, SLOT_IDS)
    n = len(ids_T)
    x = torch.randn(n, IN, dtype=dtype)
    a = tuple(random_stacked(RANK, IN, dtype=dtype) for _ in SLICES)
    b = tuple(random_stacked(width, RANK, dtype=dtype) for width in SLICES)
    y0 = torch.randn(n, sum(SLICES), dtype=dtype)
    y = y0.clone()
    wrapper.add_lora_linear(y, x, a, b, 0.5, SLICES)
    expected = ref_linear(y0, x, a, b, 0.5, SLICES, slots_of(ids_T, SLOT_IDS))
    torch.testing.assert_close(y.double(), expected, **tolerance(dtype))
    if mapping == "all_base":
        assert torch.equal(y, y0)


@pytest.mark.parametrize("is_prefill", [True, False], ids=["prefill", "decode"])
@pytest.mark.parametrize("mapping", ["runs_with_base", "interleaved"])
def test_add_lora_linear_matches_stock_when_last_slot_is_empty(mapping: str, is_prefill: bool) -> None:
    """Stock is correct when slot -1 (= the last slot) holds zeros: then the two agree."""
    ids_T = [i if i != 3 else 0 for i in MAPPINGS[mapping]]  # id 3 lives in the last slot
    n = len(ids_T)
    x = torch.randn(n, IN)
    a = tuple(random_stacked(RANK, IN, dtype=torch.float32, empty_slots=(2,)) for _ in SLICES)
    b = tuple(random_stacked(w, RANK, dtype=torch.float32, empty_slots=(2,)) for w in SLICES)
    y0 = torch.randn(n, sum(SLICES))
    outputs = []
    for cls in (GroupedPunicaWrapperCPU, PunicaWrapperCPU):
        y = y0.clone()
        make_wrapper(cls, ids_T, ids_T, is_prefill, SLOT_IDS).add_lora_linear(y, x, a, b, 1.0, SLICES)
        outputs.append(y)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_stock_ops_give_unadapted_tokens_the_last_slots_adapter() -> None:
    """The bug this module fixes: in stock, index -1 selects the last slot's weights."""
    ids_T = [3, 3, 0, 0]  # two adapter tokens (id 3 in the last slot), two base tokens
    x = torch.randn(4, IN)
    a = (random_stacked(RANK, IN, dtype=torch.float32),)
    b = (random_stacked(8, RANK, dtype=torch.float32),)
    y_stock, y_ours = torch.zeros(4, 8), torch.zeros(4, 8)
    make_wrapper(PunicaWrapperCPU, ids_T, ids_T, True, SLOT_IDS).add_lora_linear(y_stock, x, a, b, 1.0, (8,))
    make_wrapper(GroupedPunicaWrapperCPU, ids_T, ids_T, True, SLOT_IDS).add_lora_linear(y_ours, x, a, b, 1.0, (8,))
    assert torch.equal(y_ours[2:], torch.zeros(2, 8))
    assert y_stock[2:].abs().min() > 0  # base tokens received slot 2's delta
    torch.testing.assert_close(y_ours[:2], y_stock[:2])


@pytest.mark.parametrize("is_prefill", [True, False], ids=["prefill", "decode"])
@pytest.mark.parametrize("mapping", MAPPINGS, ids=list(MAPPINGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_shrink_and_add_expand_match_reference(mapping: str, is_prefill: bool, dtype: torch.dtype) -> None:
    """The row-parallel path: shrink into a float32 (slices, tokens, rank) buffer, then expand
    into y from `offset_start` (the six private shrink/expand methods underneath)."""
    ids_T = MAPPINGS[mapping]
    slots_T = slots_of(ids_T, SLOT_IDS)
    n, offset = len(ids_T), 3
    wrapper = make_wrapper(GroupedPunicaWrapperCPU, ids_T, ids_T, is_prefill, SLOT_IDS)
    x = torch.randn(n, IN, dtype=dtype)
    a = tuple(random_stacked(RANK, IN, dtype=dtype) for _ in SLICES)
    b = tuple(random_stacked(width, RANK, dtype=dtype) for width in SLICES)
    buffer = torch.zeros(len(SLICES), n, RANK, dtype=torch.float32)  # as vLLM allocates it
    tol = tolerance(torch.float32 if dtype == torch.float64 else dtype)
    wrapper.add_shrink(buffer, x, a, 2.0)
    for i in range(len(SLICES)):
        for t, s in enumerate(slots_T):
            want = 2.0 * x[t].double() @ a[i][s, 0].double().T if s >= 0 else torch.zeros(RANK)
            torch.testing.assert_close(buffer[i, t].double(), want.double(), **tol)
    y0 = torch.randn(n, offset + sum(SLICES), dtype=dtype)
    y = y0.clone()
    wrapper.add_expand(y, buffer, b, SLICES, offset_start=offset)
    expected = y0.double().clone()
    expected[:, offset:] = ref_linear(y0[:, offset:], x, a, b, 2.0, SLICES, slots_T)
    torch.testing.assert_close(y.double(), expected, **tol)


@pytest.mark.parametrize("is_prefill", [True, False], ids=["prefill", "decode"])
def test_expand_without_add_inputs_overwrites_adapted_rows_only(is_prefill: bool) -> None:
    ids_T = MAPPINGS["interleaved"]
    slots_T = slots_of(ids_T, SLOT_IDS)
    wrapper = make_wrapper(GroupedPunicaWrapperCPU, ids_T, ids_T, is_prefill, SLOT_IDS)
    h = torch.randn(len(ids_T), RANK)
    b = random_stacked(8, RANK, dtype=torch.float32)
    y0 = torch.randn(len(ids_T), 12)
    y = y0.clone()
    wrapper._apply_expand(y, h, b, 2, 8, add_inputs=False)
    for t, s in enumerate(slots_T):
        want = y0[t].clone()
        if s >= 0:
            want[2:10] = h[t] @ b[s, 0].T
        torch.testing.assert_close(y[t], want)


@pytest.mark.parametrize("is_prefill", [True, False], ids=["prefill", "decode"])
@pytest.mark.parametrize("mapping", MAPPINGS, ids=list(MAPPINGS))
def test_add_lora_embedding_matches_reference(mapping: str, is_prefill: bool) -> None:
    ids_T = MAPPINGS[mapping]
    slots_T = slots_of(ids_T, SLOT_IDS)
    wrapper = make_wrapper(GroupedPunicaWrapperCPU, ids_T, ids_T, is_prefill, SLOT_IDS)
    x = torch.randn(len(ids_T), RANK)  # the LoRA-A embeddings, looked up by the layer
    b = random_stacked(IN, RANK, dtype=torch.float32)
    y0 = torch.randn(len(ids_T), IN)
    y = y0.clone()
    wrapper.add_lora_embedding(y, x, b, add_inputs=True)
    expected = y0.double().clone()
    for t, s in enumerate(slots_T):
        if s >= 0:
            expected[t] += x[t].double() @ b[s, 0].double().T
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_buffer", [False, True], ids=["no_buffer", "buffer"])
@pytest.mark.parametrize("prompt_ids", [[1, 0, 3, 2], [1, 1], [0, 0], [3, 0, 0]])
def test_add_lora_logits_uses_sampler_indices(prompt_ids: list[int], with_buffer: bool) -> None:
    """Logits rows follow the per-request mapping; the padded vocabulary is cut to y's width."""
    ids_T = [i for i in prompt_ids for _ in range(3)]  # 3 prompt tokens per request
    slots_R = slots_of(prompt_ids, SLOT_IDS)
    wrapper = make_wrapper(GroupedPunicaWrapperCPU, ids_T, prompt_ids, True, SLOT_IDS)
    x = torch.randn(len(prompt_ids), IN)
    a = random_stacked(RANK, IN, dtype=torch.float32)
    b = random_stacked(VOCAB + 8, RANK, dtype=torch.float32)  # lm_head padding
    y0 = torch.randn(len(prompt_ids), VOCAB)
    y = y0.clone()
    buffer = torch.zeros(len(prompt_ids), RANK) if with_buffer else None
    wrapper.add_lora_logits(y, x, a, b, 0.5, buffer=buffer)
    expected = y0.double().clone()
    for r, s in enumerate(slots_R):
        if s >= 0:
            expected[r] += (0.5 * x[r].double() @ a[s, 0].double().T) @ b[s, 0, :VOCAB].double().T
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    if 2 not in slots_R:  # last slot unused: stock is correct and must agree
        b_stock = b.clone()
        a_stock = a.clone()
        a_stock[2], b_stock[2] = 0, 0
        expected_stock = y0.clone()
        make_wrapper(PunicaWrapperCPU, ids_T, prompt_ids, True, SLOT_IDS).add_lora_logits(expected_stock, x, a_stock, b_stock, 0.5)
        torch.testing.assert_close(y, expected_stock, atol=1e-5, rtol=1e-5)


def test_add_lora_logits_skips_adapters_without_lm_head() -> None:
    """vLLM wraps the logits even when no adapter targets lm_head; its slots then hold zeros."""
    prompt_ids = [1, 2]
    ids_T = [1, 1, 2, 2]
    wrapper = make_wrapper(GroupedPunicaWrapperCPU, ids_T, prompt_ids, True, SLOT_IDS)
    a = random_stacked(RANK, IN, dtype=torch.float32, empty_slots=(0,))  # id 2 lives in slot 0
    b = random_stacked(VOCAB, RANK, dtype=torch.float32, empty_slots=(1,))  # id 1 in slot 1
    y0 = torch.randn(2, VOCAB)
    y = y0.clone()
    wrapper.add_lora_logits(y, torch.randn(2, IN), a, b, 1.0)
    assert torch.equal(y, y0)
    assert wrapper._weights.get((a,), (b,), (VOCAB,), 0).a is None


def test_zero_padding_and_zero_slots_are_skipped_exactly_and_tracked_in_place() -> None:
    """A rank-2 adapter in rank-4 slots, a slice the adapter leaves out (B = 0), then weights
    rewritten in place as vLLM does when it loads a new adapter into the same slot."""
    ids_T = [1, 1, 0, 2, 2]
    slots_T = slots_of(ids_T, SLOT_IDS)
    wrapper = make_wrapper(GroupedPunicaWrapperCPU, ids_T, ids_T, True, SLOT_IDS)
    x = torch.randn(len(ids_T), IN)
    a = tuple(random_stacked(RANK, IN, dtype=torch.float32) for _ in SLICES)
    b = tuple(random_stacked(w, RANK, dtype=torch.float32) for w in SLICES)
    for a_i, b_i in zip(a, b):
        a_i[:, :, 2:] = 0  # rank 2 of 4 used
        b_i[:, :, :, 2:] = 0
    b[1][1] = 0  # slot 1 (id 1) leaves out slice 1

    def check() -> None:
        y = torch.zeros(len(ids_T), sum(SLICES))
        wrapper.add_lora_linear(y, x, a, b, 1.0, SLICES)
        expected = ref_linear(torch.zeros_like(y), x, a, b, 1.0, SLICES, slots_T)
        torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)

    check()
    cached = wrapper._weights.get(a, b, SLICES, 1)
    assert cached.a is not None and cached.a.shape[0] == 2 + 2  # slices 0 and 2, rank 2 each
    assert cached.cols == (slice(0, 16), slice(24, 32))
    with torch.inference_mode():  # vLLM's set_lora: in-place copies into the stacked tensors
        a[0][1, 0].copy_(torch.randn(RANK, IN))
        b[1][1, 0].copy_(torch.randn(SLICES[1], RANK))
    check()
    cached = wrapper._weights.get(a, b, SLICES, 1)
    assert cached.a is not None and cached.a.shape[0] == RANK + 2 + 2
    assert cached.cols == (slice(0, 16), slice(16, 24), slice(24, 32))


# ---------------------------------------------------------------------------- plugin


def test_plugin_switches_cpu_wrapper_idempotently_and_obeys_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.metadata

    from vllm.lora.punica_wrapper.punica_selector import get_punica_wrapper
    from vllm.platforms import current_platform

    from rlora.engine.vllm_plugin import register

    names = {ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert "rlora.engine.vllm_plugin:register" in names, "pip install -e . to declare the plugin"
    assert current_platform.is_cpu()
    register()
    register()  # idempotent
    monkeypatch.delenv("RLORA_FAST_LORA", raising=False)
    assert type(get_punica_wrapper(64, 8, device="cpu")) is GroupedPunicaWrapperCPU
    monkeypatch.setenv("RLORA_FAST_LORA", "0")
    assert type(get_punica_wrapper(64, 8, device="cpu")) is PunicaWrapperCPU


# ---------------------------------------------------------------------------- engine (slow)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Three plus four equals",
    "Once upon a time, a small robot",
]
USES_LORA = [True, False, True, False]  # one mixed batch: LoRA and base requests alternate


@dataclass(frozen=True)
class Sampled:
    """One greedy completion and the engine's logprob of each of its tokens."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]


def save_random_adapter(model_path: str, out_dir: Path, rank: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), config)
    model.save_pretrained(out_dir)


def hf_logprobs(model: torch.nn.Module, sampled: Sampled) -> torch.Tensor:
    """(T,) log-probabilities of the completion's tokens under a transformers model."""
    ids = torch.tensor([sampled.prompt_ids + sampled.token_ids])
    with torch.no_grad():
        logits_T_V = model(ids).logits[0, len(sampled.prompt_ids) - 1 : -1].float()
    targets_T = torch.tensor(sampled.token_ids)
    return torch.log_softmax(logits_T_V, -1).gather(1, targets_T[:, None])[:, 0]


def punica_wrapper_types(worker: object) -> list[str]:
    """Runs in the engine's worker (collective_rpc): the wrapper classes of its LoRA layers."""
    model = worker.model_runner.get_model()  # type: ignore[attr-defined]
    layers = [m for m in model.modules() if hasattr(m, "punica_wrapper")]
    return sorted({type(m.punica_wrapper).__name__ for m in layers})


@pytest.fixture(scope="module")
def engine_and_adapter(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LLM, str, str]]:
    """An in-process float32 engine with ONE adapter slot: the case the stock ops got wrong."""
    from vllm import LLM

    from rlora.train.models import resolve_model

    model_path = resolve_model("default")
    adapter_dir = tmp_path_factory.mktemp("adapter")
    save_random_adapter(model_path, adapter_dir, rank=8)
    set_num_threads = torch.set_num_threads  # the CPU worker replaces it process-wide
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        mp.delenv("RLORA_FAST_LORA", raising=False)
        llm = LLM(
            model=model_path,
            dtype="float32",
            enforce_eager=True,
            block_size=32,
            max_model_len=512,
            max_num_seqs=8,
            enable_lora=True,
            max_lora_rank=8,
            max_loras=1,
        )
        yield llm, model_path, str(adapter_dir)
    del llm
    torch.set_num_threads = set_num_threads


@pytest.mark.slow
def test_engine_lora_logprobs_match_peft_and_mixed_batches_are_separated(
    engine_and_adapter: tuple[LLM, str, str],
) -> None:
    """float32 engine vs transformers(+peft) float32, and a mixed batch vs separate calls.

    With vLLM's stock ops this fails: the base requests of the mixed batch get the adapter.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    llm, model_path, adapter_dir = engine_and_adapter
    assert llm.collective_rpc(punica_wrapper_types) == [["GroupedPunicaWrapperCPU"]]
    lora = LoRARequest("random-r8", 1, adapter_dir)
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0, ignore_eos=True)

    def sample(prompts: list[str], loras: list[LoRARequest | None]) -> list[Sampled]:
        llm.reset_prefix_cache()
        outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        return [
            Sampled(
                prompt_ids=list(out.prompt_token_ids),
                token_ids=list(c.token_ids),
                logprobs=[step[t].logprob for t, step in zip(c.token_ids, c.logprobs)],
            )
            for out in outputs
            for c in out.outputs
        ]

    mixed = sample(PROMPTS, [lora if u else None for u in USES_LORA])
    with_lora = iter(sample([p for p, u in zip(PROMPTS, USES_LORA) if u], [lora, lora]))
    without = iter(sample([p for p, u in zip(PROMPTS, USES_LORA) if not u], [None, None]))
    separate = [next(with_lora) if u else next(without) for u in USES_LORA]
    for m, s in zip(mixed, separate):
        assert m.token_ids == s.token_ids, "a mixed batch changed a request's greedy tokens"
        torch.testing.assert_close(torch.tensor(m.logprobs), torch.tensor(s.logprobs), atol=1e-4, rtol=0)

    base = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    for m, uses_lora in zip(mixed, USES_LORA):
        if uses_lora:
            want = hf_logprobs(peft_model, m)
        else:
            with peft_model.disable_adapter():
                want = hf_logprobs(peft_model, m)
        torch.testing.assert_close(torch.tensor(m.logprobs), want, atol=2e-4, rtol=0)
    with peft_model.disable_adapter():  # the adapter matters, so the checks above have teeth
        unadapted = hf_logprobs(peft_model, mixed[0])
    assert (unadapted - torch.tensor(mixed[0].logprobs)).abs().max() > 0.1


CHILD_SCRIPT = textwrap.dedent(
    """
    import sys
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    def main():
        model_path, adapter_dir = sys.argv[1], sys.argv[2]
        llm = LLM(model=model_path, dtype="float32", enforce_eager=True, block_size=32,
                  max_model_len=512, max_num_seqs=4, enable_lora=True, max_lora_rank=8,
                  max_loras=1)
        params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=0, ignore_eos=True)
        lora = LoRARequest("random-r8", 1, adapter_dir)
        prompts = ["The capital of France is", "Three plus four equals"]
        def logprobs(outs):
            return [[s[t].logprob for t, s in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                    for o in outs]
        mixed = logprobs(llm.generate(prompts, params, lora_request=[lora, None], use_tqdm=False))
        llm.reset_prefix_cache()
        base = logprobs(llm.generate(prompts[1:], params, use_tqdm=False))
        err = max(abs(a - b) for a, b in zip(mixed[1], base[0]))
        print("RESULT base_err", err, flush=True)

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.slow
def test_plugin_active_in_separate_engine_process(tmp_path: Path) -> None:
    """Default multiprocess engine: the engine core process loads the plugin itself; a base
    request batched with a LoRA request keeps the base model's logprobs."""
    from rlora.train.models import resolve_model

    model_path = resolve_model("default")
    save_random_adapter(model_path, tmp_path / "adapter", rank=8)
    script = tmp_path / "child.py"
    script.write_text(CHILD_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "RLORA_FAST_LORA"}
    # INFO: the plugin announces the wrapper it installs at INFO (rlora runs keep vLLM at WARNING)
    env |= {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "INFO"}
    proc = subprocess.run(
        [sys.executable, str(script), model_path, str(tmp_path / "adapter")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Using GroupedPunicaWrapperCPU" in log
    result = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    err = float(result.split()[-1])
    assert err < 1e-4, f"base request in a mixed batch is off by {err}"
