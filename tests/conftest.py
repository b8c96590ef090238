"""Fixtures shared by several test modules."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from rlora.rl.types import Group, Prompt, Rollout

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}


def save_tiny_llama(path: Path, seed: int, **config: object) -> str:
    """A random Llama built from `config` with torch seed `seed`, saved in `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """A random 2-layer Llama with tied embeddings (vocab 128), saved once: seconds to load, every code path of a real one."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), 0, **TINY, max_position_embeddings=64, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_model_with_tokenizer(tmp_path_factory) -> str:
    """A random 2-layer Llama (2 heads of 64: TP 2 divides them; vLLM's CPU attention wants head_dim 64)
    with the default model's tokenizer."""
    from transformers import AutoConfig

    from rlora.train.models import resolve_model

    source = Path(resolve_model("default"))
    base = AutoConfig.from_pretrained(source)
    path = tmp_path_factory.mktemp("tiny_tok")
    save_tiny_llama(
        path,
        0,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=base.vocab_size,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
    )
    for f in source.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, path / f.name)
    return str(path)


@pytest.fixture(scope="session")
def tiny_untied_model_path(tmp_path_factory) -> str:
    """The tiny Llama with a separate output layer, like the 8B models: FSDP shards its embedding and output layer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_untied"), 1, **TINY, max_position_embeddings=64, tie_word_embeddings=False)


def random_groups(seed: int = 0, version: int = 0, num_prompts: int = 3) -> list[Group]:
    """Groups of 4 with mixed rewards, ragged lengths and made-up sampler logprobs (so ratios are far from 1)."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for p in range(num_prompts):
        prompt_ids = tuple(torch.randint(3, 128, (4 + p,), generator=g).tolist())
        rollouts = []
        for i in range(4):
            comp = tuple(torch.randint(3, 128, (2 + (i * 3 + p) % 5,), generator=g).tolist())
            lps = tuple((-torch.rand(len(comp), generator=g) * 4).tolist())
            rollouts.append(Rollout(prompt_ids=prompt_ids, completion_ids=comp, sampler_logprobs=lps, reward=float(i % 2), text="", finish_reason="stop"))
        prompt = Prompt(problem_id=f"p{p}", question="q", prompt_ids=prompt_ids, reference="1", reward_task="number")
        groups.append(Group(prompt=prompt, rollouts=tuple(rollouts), policy_version=version))
    return groups
