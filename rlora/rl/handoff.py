"""Handing the learner's policy to the engine, and proving that every engine worker serves it.

`publish` is the one explicit handoff call: an adapter directory for LoRA (a new vLLM id, name
and path per version, so the prefix cache can never serve KV from an older policy), the full
weights for FullFT. Then two checks, and any failure stops the run with `HandoffError`:

1. The probe (statistical, end to end): a short fixed exchange in the run's prompt format is
   scored by the engine and by the learner; the mean per-token gap must stay within a tolerance
   calibrated at the first handoff of the run, when both sides hold identical weights (`Probe`).
   FullFT defers the engine's half to its next sampling call (`publish(defer_probe=True)`).
   It covers what fingerprints do not see: the engine's whole forward and logprob path, layouts
   (a transposed load), LoRA scaling and routing, the prefix cache.
2. Fingerprints (exact): every engine worker (each tensor-parallel rank; each tenant's adapter
   on a shared engine) fingerprints the weights it actually serves for this version (the LoRA
   slot buffers the forward pass reads, or every FullFT weight read back through the engine's
   own packed GEMM), and each must equal the fingerprint of the learner's weights put through
   the engine's casts (`rlora.engine.fingerprint`). One changed element in any layer is caught,
   and the error names the worker, the tensor and the version. A LoRA run also checks the frozen
   base once, at its first handoff (an engine started from another checkpoint than the learner's).
   FullFT on CPU reads its packed GEMMs back whole at the run's first handoff and every
   `fingerprint_full_every`-th version, and a fresh random `fingerprint_fraction` of their input
   columns (and of the embedding's) in between (a whole read-back is a matrix product per layer,
   ~2 s for 135M parameters on 2 cores); a stale or partial handoff leaves whole tensors old,
   which the sample catches.

Why both: in bf16 one optimizer step moves the probe by less than the bf16 engine/learner noise
(a stale engine passed the old probe in 8 of 8 measured cases), so only the fingerprint can tell
a policy that did not arrive; the probe stays as the end-to-end check.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from rlora.data import render_turn, resolve_prompt_format
from rlora.engine.fingerprint import (
    EMPTY,
    Fingerprint,
    ServedTensor,
    WorkerPrints,
    cast_like_vllm_lora_b,
    chunk_fingerprints,
    fingerprint,
    sampled_columns,
    tensor_seed,
)
from rlora.engine.sampler import EngineSpec
from rlora.rl.types import Tokenizer
from rlora.train import lora
from rlora.train.learner import DTYPES, LearnerHandle

PROBE_MESSAGES = [
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42."},
]
# Probe tolerance = max(PROBE_CALIBRATION_X x the gap measured at the first handoff, the dtype's floor).
# Measured gaps with identical weights: ~1e-5 nats/token in float32, 0.03-0.09 in bf16
# (../shared/notes/vllm_cpu.md); the gap grows somewhat as the policy sharpens, hence the factor.
PROBE_CALIBRATION_X = 5.0
PROBE_FLOOR = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05}


class HandoffError(RuntimeError):
    """The sampler does not serve the policy the learner just produced."""


def probe_ids(tokenizer: Tokenizer, prompt_format: str = "auto") -> list[int]:
    """The probe exchange in the run's prompt format, from the line holding the question on.

    What a format puts before that line (a chat template's default system prompt, few-shot
    examples) is left out: each probe token is a forward token on both sides at every handoff.
    On CPU a probe costs ~0.3 s whatever its length (each side streams the weights once) plus its
    tokens; 29 tokens under SmolLM2's chat template, against 68 with the template's system prompt
    and a longer exchange, took 0.45 s instead of 0.8 (docs/benchmarks.md). A base model without a
    chat template gets plain text.
    """
    name = resolve_prompt_format(prompt_format, tokenizer)
    question, answer = PROBE_MESSAGES[0]["content"], PROBE_MESSAGES[1]["content"]
    text = render_turn(question, answer, "number", tokenizer, name)
    text = text[text.rfind("\n", 0, text.rindex(question)) + 1 :]
    return tokenizer.encode(text, add_special_tokens=name != "chat")


@dataclass
class Probe:
    """A fixed sequence scored after every handoff, its calibrated tolerance, and the previous policy's scores."""

    token_ids: list[int]
    floor: float  # the smallest tolerance (PROBE_FLOOR[dtype]); with `fixed` the tolerance itself (config probe_tol)
    fixed: bool = False
    tol: float | None = None  # set at the first handoff: max(PROBE_CALIBRATION_X x gap, floor)
    calibration_gap: float | None = None  # the gap measured then, when both sides held identical weights
    previous_lp: np.ndarray | None = None
    base_verified: bool = False  # LoRA: the frozen base's fingerprints were checked (once per run)
    # FullFT on CPU: the share of each packed GEMM's input columns read back at a handoff (1 = all);
    # the first handoff of a run and every `fingerprint_full_every`-th version read back everything
    fingerprint_fraction: float = 1.0
    fingerprint_full_every: int = 1
    # FullFT with `publish(defer_probe=True)`: (version, the learner's scores) until the engine scores
    # the probe in its next sampling call (`judge_deferred`)
    pending: tuple[int, np.ndarray] | None = None

    def fingerprint_fraction_for(self, version: int) -> float:
        """This handoff's share of the packed GEMMs' columns to read back: all at the run's first
        handoff (before calibration) and every `fingerprint_full_every`-th version, else the sample."""
        whole = self.tol is None or self.fingerprint_full_every <= 1 or version % self.fingerprint_full_every == 0
        return 1.0 if whole else self.fingerprint_fraction

    def calibrate(self, gap: float) -> float:
        if self.tol is None:
            self.calibration_gap = gap
            self.tol = self.floor if self.fixed else max(PROBE_CALIBRATION_X * gap, self.floor)
        return self.tol


def make_probe(
    tokenizer: Tokenizer, dtype: str, probe_tol: float = 0.0, prompt_format: str = "auto", fingerprint_fraction: float = 1.0, fingerprint_full_every: int = 1
) -> Probe:
    """The run's probe: calibrated at the first handoff, or with a fixed tolerance when probe_tol > 0;
    with the run's fingerprint sampling (config keys of the same names; the defaults check everything)."""
    return Probe(
        probe_ids(tokenizer, prompt_format),
        probe_tol or PROBE_FLOOR[dtype],
        fixed=bool(probe_tol),
        fingerprint_fraction=fingerprint_fraction,
        fingerprint_full_every=fingerprint_full_every,
    )


class Engine(Protocol):
    """What `publish` uses of the engine: a `Sampler`, or one tenant's `AdapterSlot` of a shared one."""

    @property
    def spec(self) -> EngineSpec: ...

    def load_adapter(self, write_adapter: Callable[[Path], object], version: int) -> None: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None: ...

    def prompt_logprobs(self, token_ids: Sequence[int]) -> list[float]: ...

    def served_prints(self, *, seed: int = 0, fraction: float = 1.0) -> list[WorkerPrints]: ...

    def served_base_prints(self) -> list[WorkerPrints]: ...

    def lora_id(self) -> int: ...


# ------------------------------------------------------------------------------------ the learner's side


@dataclass(frozen=True)
class Expected:
    """A learner tensor after the engine's casts: its fingerprint whole and in tensor-parallel shards."""

    whole: Fingerprint
    rows: tuple[Fingerprint, ...]  # tp equal shards along dim 0 (column parallel, vocabulary)
    cols: tuple[Fingerprint, ...]  # along dim 1 (row parallel); () for 1-D tensors


Columns = tuple[int, ...]  # () for a whole tensor, else (seed, size, count) of `sampled_columns`


def expect(tensor: torch.Tensor, tp: int, columns: Columns = ()) -> Expected:
    """A learner tensor's fingerprints as tp workers would hold it; with `columns`, only those input
    columns (dim 1) of what each worker holds: of the whole tensor, or of each column shard."""
    if columns:
        sel = sampled_columns(*columns)
        size = columns[1]
        if tensor.ndim == 2 and tensor.shape[1] == size:  # replicated or row-sharded: the worker holds every column
            sub = tensor[:, sel]
            if tp > 1:
                return expect(sub, tp)
            whole = fingerprint(sub)
            return Expected(whole, (whole,), ())
        if tensor.ndim == 2 and tp > 1 and tensor.shape[1] == size * tp:  # column-sharded: each worker's own columns
            cols = tuple(fingerprint(c[:, sel]) for c in torch.chunk(tensor, tp, 1))
            whole = EMPTY
            for fp in cols:
                whole = whole + fp
            return Expected(whole, (), cols)
        return Expected(Fingerprint(-1, -1), (), ())  # no worker could have read these columns of this tensor
    if tp == 1:
        whole = fingerprint(tensor)
        return Expected(whole, (whole,), (whole,))
    rows = chunk_fingerprints(tensor, tp, 0)
    cols = chunk_fingerprints(tensor, tp, 1) if tensor.ndim > 1 else ()
    whole = EMPTY
    for fp in rows:
        whole = whole + fp
    return Expected(whole, rows, cols)


def adapter_as_served(learner: LearnerHandle, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The learner's LoRA factors as vLLM serves them: A cast to the engine dtype, B cast then scaled
    by lora_alpha / r in that dtype (vLLM folds the scale into B)."""
    spec = learner.spec.lora
    assert spec is not None
    scaling = float(lora.peft_config(spec, "")["lora_alpha"]) / spec.rank  # type: ignore[arg-type]  # vLLM's peft_helper: lora_alpha / r
    for name, t in learner.adapter_tensors().items():
        yield name, (t.detach().to(dtype) if name.endswith(".lora_A") else cast_like_vllm_lora_b(t, dtype, scaling))


def weights_as_served(learner: LearnerHandle, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight in checkpoint names, cast to the engine dtype (vLLM's `copy_` into its parameters
    rounds the same way). A LoRA model's frozen base appears under its plain names; A and B do not."""
    for name, t in learner.weights():
        if ".lora_A" in name or ".lora_B" in name:
            continue
        yield name.replace(".base.", "."), t.detach().to(dtype)


Wanted = dict[str, set[Columns]]  # per learner tensor, the column samples the engine's tensors need


def wanted_from(workers: Sequence[WorkerPrints]) -> Wanted:
    """Which fingerprints of which learner tensors the workers' report needs (whole, or sampled columns)."""
    wanted: Wanted = {}
    for w in workers:
        for t in w.tensors:
            for source in t.sources:
                wanted.setdefault(source, set()).add(t.columns)
    return wanted


def learner_prints(tensors: Iterable[tuple[str, torch.Tensor]], tp: int, wanted: Wanted | None = None) -> dict[tuple[str, Columns], Expected]:
    """The learner's fingerprints, keyed by (tensor name, columns); every tensor whole when `wanted` is
    None. A tensor the workers do not report is only checked for being all zeros (see `check_prints`)."""
    out: dict[tuple[str, Columns], Expected] = {}
    for name, t in tensors:
        needs = {()} if wanted is None else wanted.get(name)
        if needs is None:
            out[(name, UNSERVED)] = Expected(Fingerprint(0, int(torch.count_nonzero(t))), (), ())
            continue
        for columns in needs:
            out[(name, columns)] = expect(t, tp, columns)
    return out


UNSERVED: Columns = (-1,)  # the key of a learner tensor no worker reported: only its nonzero count is kept


# ------------------------------------------------------------------------------------ the comparison

RULES = ("replicated", "rows", "cols")  # how tensor parallelism deals a tensor to its ranks


def expected_on(sources: Sequence[str], expected: dict[tuple[str, Columns], Expected], rule: str, tp_rank: int, columns: Columns = ()) -> Fingerprint:
    """What a worker of `tp_rank` must hold for a served tensor packed from `sources` under a sharding rule."""
    total = EMPTY
    for source in sources:
        e = expected.get((source, columns))
        if e is None:  # a tensor the learner does not have: the engine must hold zeros (e.g. an untargeted LoRA layer)
            continue
        shards = {"replicated": None, "rows": e.rows, "cols": e.cols}[rule]
        if shards is None:
            total = total + e.whole
        elif tp_rank < len(shards):
            total = total + shards[tp_rank]
        else:
            return Fingerprint(-1, -1)  # this rule cannot apply
    return total


def check_prints(workers: Sequence[WorkerPrints], expected: dict[tuple[str, Columns], Expected], version: int, what: str) -> int:
    """Every served tensor on every worker against the learner's; raises HandoffError naming the first
    mismatches (worker, tensor, version). Returns how many (worker, tensor) pairs were compared.

    A tensor passes when every worker holds the learner's whole tensor (replicated), or worker r
    holds the r-th of tp equal shards along rows or columns; failing that, when the shards sum to
    the whole (a sharding these rules do not model). A learner tensor no worker serves fails too.
    """
    assert workers, "the engine reported no workers"
    by_name: dict[str, list[tuple[WorkerPrints, ServedTensor]]] = {}
    for w in workers:
        for t in w.tensors:
            by_name.setdefault(t.name, []).append((w, t))
    problems: list[str] = []
    covered: set[str] = set()
    for held in by_name.values():
        sources = held[0][1].sources
        covered.update(sources)
        best: list[tuple[WorkerPrints, ServedTensor, Fingerprint]] = []
        for rule in RULES:
            wrong = [(w, t, want) for w, t in held if t.print != (want := expected_on(sources, expected, rule, w.tp_rank, t.columns))]
            if not wrong:
                best = []
                break
            if not best or len(wrong) < len(best):
                best = wrong
        if not best:
            continue
        total = EMPTY
        for _, t in held:
            total = total + t.print
        if len(held) > 1 and total == expected_on(sources, expected, "replicated", 0, held[0][1].columns):
            continue
        for w, t, want in best:
            learner = "+".join(sources)
            sampled = f" (input columns sampled: {t.columns[2]} of {t.columns[1]})" if t.columns else ""
            problems.append(
                f"worker {w.rank} (tensor-parallel rank {w.tp_rank}/{w.tp_size}) serves {t.name} with fingerprint {t.print.short()}, "
                f"but the learner's {learner} gives {want.short()}{sampled}"
            )
    missing = sorted({n for (n, _), e in expected.items() if n not in covered and e.whole.nonzero})
    problems += [f"no worker serves the learner's {n}" for n in missing[:3]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise HandoffError(f"policy v{version}: the engine does not serve the learner's {what}: " + "; ".join(problems[:3]) + more)
    return sum(len(held) for held in by_name.values())


def check_slots(workers: Sequence[WorkerPrints], lora_id: int, version: int) -> None:
    """LoRA: every worker must hold the version's adapter id in a slot (else it serves another one, or none)."""
    for w in workers:
        if w.slot < 0:
            raise HandoffError(
                f"policy v{version}: worker {w.rank} (tensor-parallel rank {w.tp_rank}/{w.tp_size}) holds adapter id {lora_id} "
                f"in no slot (its slots hold ids {list(w.slots)}): it does not serve this version"
            )


def check_seeds(workers: Sequence[WorkerPrints], seed: int, version: int) -> None:
    """A sampled read-back must use the columns this handoff asked for (an engine cannot pick its own)."""
    for w in workers:
        for t in w.tensors:
            if t.columns and t.columns[0] != tensor_seed(seed, t.name):
                raise HandoffError(f"policy v{version}: worker {w.rank} read back {t.name} at columns of seed {t.columns[0]}, not this handoff's")


def verify_fingerprints(learner: LearnerHandle, engine: Engine, version: int, check_base: bool, fraction: float = 1.0) -> dict[str, float]:
    """Compare what every worker serves with the learner's weights (module docstring, check 2).

    `fraction` < 1 (FullFT on CPU): each packed GEMM is read back at that share of its input
    columns, drawn afresh from a seed this handoff picks; plain tensors are still checked whole.
    """
    dtype = DTYPES[engine.spec.dtype]
    start = time.perf_counter()
    compared = 0
    if learner.spec.lora is not None:
        served = engine.served_prints()
        engine_s = time.perf_counter() - start
        check_slots(served, engine.lora_id(), version)
        tp = served[0].tp_size
        compared += check_prints(served, learner_prints(adapter_as_served(learner, dtype), tp), version, "adapter")
        if check_base:
            t = time.perf_counter()
            base = engine.served_base_prints()
            engine_s += time.perf_counter() - t
            compared += check_prints(base, learner_prints(weights_as_served(learner, dtype), base[0].tp_size, wanted_from(base)), version, "base weights")
        fraction = 1.0  # adapters are always fingerprinted whole (they are small)
    else:
        seed = secrets.randbits(62) if fraction < 1 else 0  # unpredictable columns: no fixed set a fault could dodge
        served = engine.served_prints(seed=seed, fraction=fraction)
        engine_s = time.perf_counter() - start
        check_seeds(served, seed, version)
        expected = learner_prints(weights_as_served(learner, dtype), served[0].tp_size, wanted_from(served))
        compared += check_prints(served, expected, version, "weights")
    total = time.perf_counter() - start
    return {
        "fingerprint_s": total,
        "fingerprint_engine_s": engine_s,
        "fingerprint_tensors": float(compared),
        "fingerprint_fraction": fraction,
        "fingerprint_ok": 1.0,
    }


# ------------------------------------------------------------------------------------ the handoff


@dataclass(frozen=True)
class ProbeScores:
    """The probe's per-token logprobs under the engine and under the learner."""

    sampler_lp: np.ndarray  # (T-1,)
    learner_lp: np.ndarray  # (T-1,)


def score_probe(learner: LearnerHandle, engine: Engine, probe: Probe) -> ProbeScores:
    """Both sides score the probe (for LoRA this also makes the engine copy the adapter into its slot)."""
    return ProbeScores(np.array(engine.prompt_logprobs(probe.token_ids)), np.array(learner.sequence_logprobs(probe.token_ids)))


def judge_probe(scores: ProbeScores, version: int, probe: Probe) -> dict[str, float]:
    """The probe (module docstring, check 1); the first call calibrates the tolerance."""
    sampler_lp, learner_lp = scores.sampler_lp, scores.learner_lp
    gap = float(np.abs(sampler_lp - learner_lp).mean())
    tol = probe.calibrate(gap)
    if not gap <= tol:
        raise HandoffError(
            f"policy v{version}: sampler and learner disagree on the probe by {gap:.4f} nats/token "
            f"(tolerance {tol:.4g}, calibrated at {probe.calibration_gap:.2g}); the engine is not serving the learner's policy"
        )
    shift = 0.0
    if probe.previous_lp is not None:
        shift = float(np.abs(learner_lp - probe.previous_lp).mean())
        stale_gap = float(np.abs(sampler_lp - probe.previous_lp).mean())
        if shift > tol and not gap < stale_gap:
            raise HandoffError(
                f"policy v{version}: the sampler disagrees with the learner by {gap:.4f} nats/token but only by "
                f"{stale_gap:.4f} with the previous policy (which moved {shift:.4f}): the engine serves a stale policy"
            )
    probe.previous_lp = learner_lp
    return {"probe_gap": gap, "probe_tol": tol, "probe_shift": shift}


def publish(learner: LearnerHandle, sampler: Engine, version: int, probe: Probe, *, defer_probe: bool = False) -> dict[str, float]:
    """Hand the learner's current policy to the engine and prove that every worker now serves it.

    Returns the step's handoff metrics: handoff_s (the transfer), probe_gap / probe_tol /
    probe_shift, fingerprint_s (both sides' fingerprints and the comparison; fingerprint_engine_s
    the engine's part), fingerprint_tensors (worker x tensor pairs compared) and verify_s (probe
    plus fingerprints; probe_s the probe's part). The probe is scored first: that makes the engine
    activate the adapter, which copies it into the slot the fingerprint then reads; the
    fingerprint's verdict comes before the probe's, since it names what is wrong.

    `defer_probe` (FullFT; the loop sets it when a sampling call at this version follows): the
    learner scores the probe now, while it holds exactly this version, and the engine scores it
    as one more request of that sampling call (`judge_deferred`, before the batch is trained)
    instead of a generate call of its own: on CPU a call of its own streams every weight once,
    ~0.2 s of the FullFT handoff's verification, against one 29-token prefill among the batch's.
    The verdict and probe_gap then come with the batch. LoRA always probes here: the probe's
    request is what copies the adapter into the slot the fingerprint reads.
    """
    assert probe.pending is None, f"policy v{probe.pending[0]}'s deferred probe was never scored by the engine"
    start = time.perf_counter()
    if learner.spec.lora is not None:
        sampler.load_adapter(learner.write_adapter, version)
    else:
        sampler.load_weights(learner.weights(), version)
    handoff_s = time.perf_counter() - start
    defer = defer_probe and learner.spec.lora is None
    t = time.perf_counter()
    if defer:  # the learner's half now; the engine's in the next sampling call (`judge_deferred`)
        probe.pending, scores = (version, np.array(learner.sequence_logprobs(probe.token_ids))), None
    else:
        scores = score_probe(learner, sampler, probe)
    probe_s = time.perf_counter() - t
    # the exact check rules first: its error names the worker, the tensor and the version
    printed = verify_fingerprints(
        learner, sampler, version, check_base=learner.spec.lora is not None and not probe.base_verified, fraction=probe.fingerprint_fraction_for(version)
    )
    probe.base_verified = True
    probed = {"probe_s": probe_s} if scores is None else {**judge_probe(scores, version, probe), "probe_s": probe_s}
    return {"handoff_s": handoff_s, **probed, **printed, "verify_s": time.perf_counter() - start - handoff_s}


def judge_deferred(probe: Probe, sampler_lp: Sequence[float], served_version: int) -> dict[str, float]:
    """A deferred probe's verdict (`publish(defer_probe=True)`), once the engine has scored it in a
    sampling call at `served_version`: probe_gap / probe_tol / probe_shift, or HandoffError."""
    assert probe.pending is not None, "no deferred probe to judge"
    version, learner_lp = probe.pending
    assert served_version == version, f"the probe of policy v{version} was scored by the engine at v{served_version}"
    probe.pending = None
    return judge_probe(ProbeScores(np.array(sampler_lp), learner_lp), version, probe)
