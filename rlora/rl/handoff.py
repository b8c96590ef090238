"""Handing the learner's policy to the engine, and proving that the engine serves it.

`publish` is the one explicit handoff call: an adapter directory for LoRA (a new vLLM id, name
and path per version, so the prefix cache can never serve KV from an older policy), the full
weights for FullFT. Then a fixed probe sequence is scored by the engine and by the learner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from rlora.data import render_turn, resolve_prompt_format
from rlora.engine.sampler import AdapterSlot, Sampler
from rlora.rl.types import Tokenizer
from rlora.train.learner import LearnerHandle

PROBE_MESSAGES = [
    {"role": "user", "content": "What is 12 + 30? Reply with just the number."},
    {"role": "assistant", "content": "12 + 30 = 42. So the answer is 42."},
]
# Per-token noise between engine and learner on the probe (mean |log p_sampler - log p_learner|):
# float32 on both sides agrees to ~1e-4; bf16 kernels differ by ~0.03-0.07 nats per token, more on
# a sharpened policy (../shared/notes/vllm_cpu.md and our runs). See `publish` for how it is used.
PROBE_NOISE = {"float32": 2e-3, "bfloat16": 0.1, "float16": 0.05}


class HandoffError(RuntimeError):
    """The sampler does not serve the policy the learner just produced."""


def probe_ids(tokenizer: Tokenizer, prompt_format: str = "auto") -> list[int]:
    """The probe exchange in the run's prompt format (a base model without a chat template gets plain text)."""
    name = resolve_prompt_format(prompt_format, tokenizer)
    text = render_turn(PROBE_MESSAGES[0]["content"], PROBE_MESSAGES[1]["content"], "number", tokenizer, name)
    return tokenizer.encode(text, add_special_tokens=name != "chat")


@dataclass
class Probe:
    """A fixed sequence scored after every handoff, and the learner's scores of the previous policy."""

    token_ids: list[int]
    noise: float  # expected engine/learner gap from numerics alone (PROBE_NOISE or probe_tol)
    previous_lp: np.ndarray | None = None


def publish(learner: LearnerHandle, sampler: Sampler | AdapterSlot, version: int, probe: Probe) -> dict[str, float]:
    """Hand the learner's current policy to the engine and prove that the engine now serves it.

    Two checks on the probe's per-token logprobs: the engine must agree with the learner within
    5x the numeric noise (a wrong or missing adapter is far off), and, whenever the policy moved
    by more than twice the noise since the last handoff, the engine must be closer to the new
    policy than to the previous one (a stale engine is closer to the previous one). In float32
    the first check alone is already tight; in bf16 the second catches staleness that hides
    inside the numeric noise of a single comparison.
    """
    start = time.perf_counter()
    if learner.spec.lora is not None:
        sampler.load_adapter(learner.write_adapter, version)
    else:
        sampler.load_weights(learner.weights(), version)
    handoff_s = time.perf_counter() - start
    sampler_lp = np.array(sampler.prompt_logprobs(probe.token_ids))
    learner_lp = np.array(learner.sequence_logprobs(probe.token_ids))
    gap = float(np.abs(sampler_lp - learner_lp).mean())
    if not gap <= 5 * probe.noise:
        raise HandoffError(
            f"policy v{version}: sampler and learner disagree on the probe by {gap:.4f} nats/token "
            f"(limit {5 * probe.noise:g}); the engine is not serving the learner's weights"
        )
    shift = 0.0
    if probe.previous_lp is not None:
        shift = float(np.abs(learner_lp - probe.previous_lp).mean())
        stale_gap = float(np.abs(sampler_lp - probe.previous_lp).mean())
        if shift > 2 * probe.noise and not gap < stale_gap:
            raise HandoffError(
                f"policy v{version}: the sampler disagrees with the learner by {gap:.4f} nats/token but only by "
                f"{stale_gap:.4f} with the previous policy (which moved {shift:.4f}): the engine serves a stale policy"
            )
    probe.previous_lp = learner_lp
    return {"handoff_s": handoff_s, "probe_gap": gap, "probe_shift": shift, "verify_s": time.perf_counter() - start - handoff_s}
