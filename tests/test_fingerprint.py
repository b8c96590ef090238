"""Fingerprints (rlora.engine.fingerprint) and their comparison (rlora.rl.handoff.check_prints), without an engine:
one changed element anywhere changes the fingerprint; packing, padding, transposes and tensor-parallel
sharding do not; the learner's cast reproduces vLLM's bit for bit; a mismatch names worker, tensor, version."""

from __future__ import annotations

import pytest
import torch

from rlora.engine.fingerprint import (
    EMPTY,
    Fingerprint,
    ServedTensor,
    WorkerPrints,
    cast_like_vllm_lora_b,
    columns_count,
    fingerprint,
    fingerprint_parts,
    sampled_columns,
    tensor_seed,
)
from rlora.rl.handoff import HandoffError, Probe, check_prints, check_seeds, check_slots, expect, learner_prints, wanted_from

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


def _worker(rank: int, tensors: dict[str, tuple[tuple[str, ...], Fingerprint]], tp: int = 1, slot: int = 0, columns: tuple[int, ...] = ()) -> WorkerPrints:
    served = tuple(ServedTensor(name, sources, fp, columns) for name, (sources, fp) in tensors.items())
    return WorkerPrints(rank=rank, tp_rank=rank, tp_size=tp, slot=slot, slots=(7,), tensors=served)


def test_check_prints_accepts_packed_and_sharded_and_names_the_bad_worker():
    q, k, v, o = (_tensor((32, 16), torch.float32, s) for s in range(4))
    expected = {(n, ()): expect(t, 2) for n, t in {"l.q_proj.weight": q, "l.k_proj.weight": k, "l.v_proj.weight": v, "l.o_proj.weight": o}.items()}
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
        check_prints(good, {**expected, ("extra", ()): expect(q, 2)}, 3, "weights")
    # an engine tensor the learner does not have must hold zeros
    zeros = [_worker(0, {"lm_head.lora_A": (("lm_head.lora_A",), EMPTY)})]
    assert check_prints(zeros, {}, 1, "adapter") == 1
    with pytest.raises(HandoffError, match="lm_head.lora_A"):
        check_prints([_worker(0, {"lm_head.lora_A": (("lm_head.lora_A",), fingerprint(q))})], {}, 1, "adapter")


def _read_back(served_N_K: torch.Tensor, columns: tuple[int, ...]) -> Fingerprint:
    """What a worker computes for a sampled check: identity rows at the sampled input columns through
    its GEMM (x @ W^T), here the plain product, which is exact for one-hot rows."""
    sel = sampled_columns(*columns)
    eye = torch.zeros(len(sel), served_N_K.shape[1], dtype=served_N_K.dtype)
    eye[torch.arange(len(sel)), sel] = 1
    return fingerprint(eye @ served_N_K.t())


@pytest.mark.parametrize("tp", [1, 2])
def test_sampled_columns_are_checked_exactly_packed_and_sharded(tp):
    """A sampled read-back (fingerprint_fraction < 1): the worker reads its packed qkv and its
    row-parallel o_proj shard at the columns drawn from the handoff's seed; the learner's `expect` with
    the same columns agrees. A change in a sampled column is caught and named; one in a column that was
    not sampled is not (the sampled check's limit: whole read-backs every fingerprint_full_every versions)."""
    q, k, v, o = (_tensor((32, 24), torch.float32, s) for s in range(4))
    weights = {"l.q_proj.weight": q, "l.k_proj.weight": k, "l.v_proj.weight": v, "l.o_proj.weight": o}
    qkv_sources = ("l.q_proj.weight", "l.k_proj.weight", "l.v_proj.weight")
    seed = 1234

    def workers(o_served: torch.Tensor) -> list[WorkerPrints]:
        out = []
        for r in range(tp):
            qkv = torch.cat([torch.chunk(t, tp, 0)[r] for t in (q, k, v)])  # column parallel: rows of each part
            o_r = torch.chunk(o_served, tp, 1)[r]  # row parallel: this worker's input columns
            c_qkv = (tensor_seed(seed, "l.qkv_proj"), qkv.shape[1], columns_count(qkv.shape[1], 0.25))
            c_o = (tensor_seed(seed, "l.o_proj"), o_r.shape[1], columns_count(o_r.shape[1], 0.25))
            tensors = (
                ServedTensor("l.qkv_proj", qkv_sources, _read_back(qkv, c_qkv), c_qkv),
                ServedTensor("l.o_proj", ("l.o_proj.weight",), _read_back(o_r, c_o), c_o),
            )
            out.append(WorkerPrints(rank=r, tp_rank=r, tp_size=tp, slot=-1, slots=(), tensors=tensors))
        return out

    good = workers(o)
    assert all(t.columns[2] < t.columns[1] for w in good for t in w.tensors)  # really a sample
    check_seeds(good, seed, 5)
    assert check_prints(good, learner_prints(weights.items(), tp, wanted_from(good)), 5, "weights") == 2 * tp
    with pytest.raises(HandoffError, match="not this handoff's"):
        check_seeds(good, seed + 1, 5)
    o_cols = good[-1].tensors[1].columns  # the last worker's sampled columns of its o_proj shard
    local = sampled_columns(*o_cols)
    offset = (tp - 1) * o_cols[1]
    changed = o.clone()
    changed[3, offset + int(local[0])] += 1e-3  # a sampled column of the last worker
    bad = workers(changed)
    with pytest.raises(HandoffError, match=rf"worker {tp - 1} .*serves l\.o_proj .*input columns sampled: {o_cols[2]} of {o_cols[1]}"):
        check_prints(bad, learner_prints(weights.items(), tp, wanted_from(bad)), 5, "weights")
    unsampled = sorted(set(range(o_cols[1])) - set(local.tolist()))[0]
    missed = o.clone()
    missed[3, offset + unsampled] += 1e-3
    quiet = workers(missed)
    assert check_prints(quiet, learner_prints(weights.items(), tp, wanted_from(quiet)), 5, "weights") == 2 * tp
    # a learner tensor no worker reports is still caught under sampling
    with pytest.raises(HandoffError, match="no worker serves the learner's l.extra"):
        check_prints(good, learner_prints([*weights.items(), ("l.extra", q)], tp, wanted_from(good)), 5, "weights")


def test_sampled_handoffs_read_everything_first_and_every_kth_version():
    probe = Probe([0], floor=1e-3, fingerprint_fraction=0.125, fingerprint_full_every=10)
    assert probe.fingerprint_fraction_for(7) == 1.0  # the run's first handoff (uncalibrated): whole
    probe.calibrate(1e-5)
    assert [probe.fingerprint_fraction_for(v) for v in (8, 9, 10, 11, 20)] == [0.125, 0.125, 1.0, 0.125, 1.0]
    assert Probe([0], floor=1e-3).fingerprint_fraction_for(3) == 1.0  # the default: every handoff whole
    assert sampled_columns(7, 100, 13).tolist() == sampled_columns(7, 100, 13).tolist() != sampled_columns(8, 100, 13).tolist()
    assert columns_count(576, 0.125) == 72 and columns_count(20, 0.125) == 8 and columns_count(4, 0.125) == 4


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
