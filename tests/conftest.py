"""Fixtures shared by several test modules."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

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
