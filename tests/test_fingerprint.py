"""Fingerprints (rlora.engine.fingerprint) and their comparison (rlora.rl.handoff.check_prints), without an engine:
one changed element anywhere changes the fingerprint; packing, padding, transposes and tensor-parallel
sharding do not; the learner's cast reproduces vLLM's bit for bit; a mismatch names worker, tensor, version."""

from __future__ import annotations

import pytest
import torch

from rlora.engine.fingerprint import EMPTY, Fingerprint, ServedTensor, WorkerPrints, cast_like_vllm_lora_b, fingerprint, fingerprint_parts
from rlora.rl.handoff import HandoffError, check_prints, check_slots, expect

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_changed_element_anywhere_changes_the_fingerprint(dtype):
    t = _tensor((64, 48), dtype)
    base = fingerprint(t)
    gen = torch.Generator().manual_seed(1)
    for flat in torch.randint(0, t.numel(), (200,), generator=gen).tolist():
        for change in ("next", "zero", "sign"):
            u = t.clone().view(-1)
            if change == "next":  # the smallest possible change: the neighbouring float
                u[flat] = torch.nextafter(u[flat : flat + 1].float(), torch.tensor([1.0])).to(dtype) if dtype == torch.float32 else u[flat] * (1 + 2**-7)
            elif change == "zero":
                u[flat] = 0
            else:
                u[flat] = -u[flat]
            if torch.equal(
                u.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32), t.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32)
            ):
                continue  # the change did not change the bits (e.g. bf16 rounding back)
            assert fingerprint(u.view_as(t)) != base, (dtype, flat, change)


def test_every_bit_pattern_of_one_element_differs():
    """The mix is a bijection: all 65536 bf16 patterns of one element give distinct fingerprints."""
    bits = torch.arange(1, 1 << 16, dtype=torch.int32).to(torch.int16)
    prints = {fingerprint(b.view(1).view(torch.bfloat16)).hash for b in bits}
    assert len(prints) == (1 << 16) - 1


def test_layout_invariance_packing_padding_transposes_sharding():
    q, k, v = _tensor((64, 32), torch.bfloat16, 1), _tensor((16, 32), torch.bfloat16, 2), _tensor((16, 32), torch.bfloat16, 3)
    qkv = torch.cat([q, k, v])
    assert fingerprint(qkv) == fingerprint(q) + fingerprint(k) + fingerprint(v) == fingerprint_parts([v, q, k])
    assert fingerprint(qkv.t().contiguous()) == fingerprint(qkv)  # a transposed copy (the read-back is W^T)
    padded = torch.zeros(100, 40, dtype=torch.bfloat16)
    padded[:96, :32] = qkv
    assert fingerprint(padded) == fingerprint(qkv)  # vocabulary / LoRA-rank zero padding
    for dim in (0, 1):  # tensor-parallel shards sum to the whole, and `expect` deals them the same way
        shards = torch.chunk(qkv, 2, dim=dim)
        e = expect(qkv, 2)
        assert fingerprint(shards[0]) + fingerprint(shards[1]) == fingerprint(qkv) == e.whole
        assert (e.rows if dim == 0 else e.cols) == tuple(fingerprint(s) for s in shards)
    assert fingerprint(torch.zeros(3, 3)) == EMPTY and fingerprint(qkv).nonzero == qkv.count_nonzero()


def test_fingerprint_chunks_big_tensors_exactly(monkeypatch):
    import rlora.engine.fingerprint as fpmod

    t = _tensor((300, 70), torch.float32)
    whole = fingerprint(t)
    monkeypatch.setattr(fpmod, "CHUNK", 1000)
    assert fingerprint(t) == whole


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scaling", [32.0, 4.0, 1.0, 32 / 8**0.5])
def test_learner_cast_equals_vllm_load_path(dtype, scaling):
    """vLLM: `tensor.to(device, dtype)` from the float32 file, then `lora.optimize()`: lora_b *= scaling."""
    from vllm.lora.lora_weights import LoRALayerWeights

    b32 = torch.randn(96, 8, generator=torch.Generator().manual_seed(0)) * 1e-3
    a32 = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    served = LoRALayerWeights("m", 8, 16, a32.to(device="cpu", dtype=dtype), b32.clone().to(device="cpu", dtype=dtype), scaling=scaling).optimize()
    assert fingerprint(served.lora_b) == fingerprint(cast_like_vllm_lora_b(b32, dtype, scaling))
    assert fingerprint(served.lora_a) == fingerprint(a32.to(dtype))


def _worker(rank: int, tensors: dict[str, tuple[tuple[str, ...], Fingerprint]], tp: int = 1, slot: int = 0) -> WorkerPrints:
    served = tuple(ServedTensor(name, sources, fp) for name, (sources, fp) in tensors.items())
    return WorkerPrints(rank=rank, tp_rank=rank, tp_size=tp, slot=slot, slots=(7,), tensors=served)


def test_check_prints_accepts_packed_and_sharded_and_names_the_bad_worker():
    q, k, v, o = (_tensor((32, 16), torch.float32, s) for s in range(4))
    expected = {n: expect(t, 2) for n, t in {"l.q_proj.weight": q, "l.k_proj.weight": k, "l.v_proj.weight": v, "l.o_proj.weight": o}.items()}
    qkv_sources = ("l.q_proj.weight", "l.k_proj.weight", "l.v_proj.weight")

    def rank_tensors(r: int, o_fp: Fingerprint) -> dict[str, tuple[tuple[str, ...], Fingerprint]]:
        qkv = fingerprint_parts(torch.chunk(t, 2, 0)[r] for t in (q, k, v))  # column parallel: rows of each part
        return {"l.qkv_proj": (qkv_sources, qkv), "l.o_proj": (("l.o_proj.weight",), o_fp)}

    good = [_worker(r, rank_tensors(r, fingerprint(torch.chunk(o, 2, 1)[r])), tp=2) for r in (0, 1)]
    assert check_prints(good, expected, 3, "weights") == 4
    stale_o = o.clone()
    stale_o[5, 12] += 1e-3  # column 12: rank 1's shard along dim 1
    bad = [good[0], _worker(1, rank_tensors(1, fingerprint(torch.chunk(stale_o, 2, 1)[1])), tp=2)]
    with pytest.raises(HandoffError, match=r"policy v3: .*worker 1 \(tensor-parallel rank 1/2\) serves l\.o_proj with fingerprint"):
        check_prints(bad, expected, 3, "weights")
    # a learner tensor no worker serves
    with pytest.raises(HandoffError, match="no worker serves the learner's extra"):
        check_prints(good, {**expected, "extra": expect(q, 2)}, 3, "weights")
    # an engine tensor the learner does not have must hold zeros
    zeros = [_worker(0, {"lm_head.lora_A": (("lm_head.lora_A",), EMPTY)})]
    assert check_prints(zeros, {}, 1, "adapter") == 1
    with pytest.raises(HandoffError, match="lm_head.lora_A"):
        check_prints([_worker(0, {"lm_head.lora_A": (("lm_head.lora_A",), fingerprint(q))})], {}, 1, "adapter")


def test_check_slots_names_the_worker_without_the_adapter():
    check_slots([_worker(0, {}), _worker(1, {})], 7, 2)
    with pytest.raises(HandoffError, match=r"policy v2: worker 1 .* holds adapter id 7 in no slot"):
        check_slots([_worker(0, {}), _worker(1, {}, slot=-1)], 7, 2)


def test_probe_calibrates_at_the_first_handoff_then_judges_every_step():
    import numpy as np

    from rlora.rl.handoff import PROBE_CALIBRATION_X, Probe, ProbeScores, judge_probe

    lp = np.linspace(-3.0, -0.1, 20)
    probe = Probe(list(range(21)), floor=1e-3)
    first = judge_probe(ProbeScores(lp + 0.002, lp), 0, probe)  # identical weights: the gap is numerics alone
    assert probe.calibration_gap == pytest.approx(0.002) and first["probe_tol"] == pytest.approx(PROBE_CALIBRATION_X * 0.002)
    assert judge_probe(ProbeScores(lp + 0.3 + 0.005, lp + 0.3), 1, probe)["probe_shift"] == pytest.approx(0.3)
    with pytest.raises(HandoffError, match=r"policy v2: sampler and learner disagree on the probe by 0\.0200"):
        judge_probe(ProbeScores(lp + 0.32, lp + 0.3), 2, probe)
    floored = Probe([0], floor=0.1)
    assert judge_probe(ProbeScores(lp, lp), 0, floored)["probe_tol"] == 0.1  # float32 can measure a zero gap
    # a stale engine hiding inside a loose tolerance: closer to the previous policy than to the new one
    loose = Probe([0], floor=0.5, fixed=True)
    judge_probe(ProbeScores(lp, lp), 0, loose)
    with pytest.raises(HandoffError, match="stale policy"):
        judge_probe(ProbeScores(lp + 0.2, lp + 0.6), 1, loose)
