"""The values that flow between the stages of an RL step.

dataset -> Prompt -> sampler -> Sample -> grading -> Rollout/Group -> batching -> TrainBatch -> learner.

Each is frozen: a stage returns new values and never edits what it was given, so a step can be
replayed or inspected stage by stage in a REPL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Any Hugging Face tokenizer (the sampler's, or AutoTokenizer's): chat template, encode, decode.
Tokenizer: TypeAlias = "PreTrainedTokenizerBase"


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """One problem as the policy sees it."""

    problem_id: str  # stable id within its dataset (used for logging and dedup)
    question: str  # the user message before the chat template
    prompt_ids: tuple[int, ...]  # the rendered prompt's token ids (chat template or plain text), fed to sampler and learner
    reference: str  # gold answer, graded by `rewards.grade(..., task)`
    reward_task: str  # the rewards task that grades it: "math", "gsm8k", "aime", "number"
    stop: tuple[str, ...] = ()  # strings that end a completion besides EOS (a base model's prompt format, rlora.data.PROMPT_FORMATS)


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One completion as the sampler produced it."""

    completion_ids: tuple[int, ...]  # sampled tokens, the EOS token included when it stopped on one
    sampler_logprobs: tuple[float, ...]  # log p_sampler of each sampled token, under the distribution sampled from
    text: str  # decoded completion
    finish_reason: str  # "stop" (EOS/stop string) or "length"


@dataclass(frozen=True, kw_only=True)
class Rollout:
    """A graded completion: everything the loss needs for one sequence."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    sampler_logprobs: tuple[float, ...]  # len == len(completion_ids)
    reward: float
    text: str
    finish_reason: str  # the sample's: "stop" (EOS/stop string) or "length" (cut at max_tokens)


@dataclass(frozen=True, kw_only=True)
class Group:
    """The G rollouts of one prompt, sampled from one policy version."""

    prompt: Prompt
    rollouts: tuple[Rollout, ...]
    policy_version: int  # the learner step whose weights the sampler used

    @property
    def rewards_G(self) -> list[float]:
        return [r.reward for r in self.rollouts]

    @property
    def cut_at_max_tokens(self) -> int:
        """How many of the G completions the sampler cut at max_tokens."""
        return sum(r.finish_reason == "length" for r in self.rollouts)

    @property
    def has_signal(self) -> bool:
        """False when every reward is equal: centred advantages are all zero, no gradient."""
        rewards_G = self.rewards_G
        return max(rewards_G) != min(rewards_G)


@dataclass(frozen=True, kw_only=True)
class TrainBatch:
    """Right-padded token rows for the learner; the loss reads only completion positions.

    Position t of `targets_B_T` is the token predicted from `tokens_B_T[:, :t+1]`, i.e. targets are
    the inputs shifted left by one; `mask_B_T` is 1 exactly where the target is a completion token.
    """

    tokens_B_T: torch.Tensor  # (B, T) int64, prompt + completion, right-padded
    targets_B_T: torch.Tensor  # (B, T) int64, tokens shifted left by one
    mask_B_T: torch.Tensor  # (B, T) float32, 1 on completion targets
    sampler_logprobs_B_T: torch.Tensor  # (B, T) float32, aligned with targets, 0 off the mask
    advantages_B: torch.Tensor  # (B,) float32, one per sequence
    lengths_B: torch.Tensor  # (B,) int64, unpadded length of each row
    staleness_B: torch.Tensor  # (B,) int64, policy versions between the row's sampler and the learner it trains (0: on-policy)

    @property
    def num_tokens(self) -> int:
        """Completion tokens that carry loss."""
        return int(self.mask_B_T.sum().item())


@dataclass(frozen=True)
class PushedWeights:
    """FullFT weights that the learner sends itself, in GPU memory (rlora.engine.weight_sync), handed to
    `Sampler.load_weights` in place of tensors: the sampler calls `push` (every learner rank takes part)."""

    push: Callable[[], None]
    nbytes: int  # bytes moved, in the engine's dtype

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise TypeError("weights pushed through vLLM's weight transfer are sent by `push`, not iterated")
