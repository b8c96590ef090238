"""rlora.train.lora: alpha rules, inits, the wrapped forward, and the PEFT adapter round trip.

Most tests use a tiny random Llama (hidden 64, 2 layers, vocab 128); one runs a short forward
of the real default model. The PEFT tests check our export against PEFT's own loader and our
loader against PEFT's own `save_pretrained`, on logits.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from rlora.train import lora
from rlora.train.lora import (
    ALPHA_DEFAULT_C,
    ALPHA_RULES,
    TARGETS_ALL_LINEAR,
    LoRALinear,
    LoRASpec,
    apply_lora,
    load_peft_adapter,
    lora_alpha,
    lora_parameters,
    lora_scale,
    lora_state_dict,
    save_peft_adapter,
)

N_LAYERS = 2


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A random Llama with k/v narrower than q (grouped-query attention), so shapes differ per target."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def tokens_B_T(batch: int = 2, length: int = 7, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids_B_T: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids_B_T).logits


def randomize_lora(model: nn.Module, seed: int = 2) -> None:
    """Give every A and B non-zero values of a size that moves the logits visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*lora_parameters(model)[0], *lora_parameters(model)[1]]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ----------------------------------------------------------------------------- alpha rules


@pytest.mark.parametrize(
    ("rule", "rank", "alpha"),
    [
        ("constant", 1, 32.0),
        ("constant", 8, 32.0),
        ("constant", 128, 32.0),
        ("per_rank", 1, 1.0),
        ("per_rank", 8, 8.0),
        ("per_rank", 128, 128.0),
        ("sqrt", 1, math.sqrt(32.0)),
        ("sqrt", 8, 16.0),
        ("sqrt", 128, 64.0),
    ],
)
def test_alpha_rule_values(rule: str, rank: int, alpha: float) -> None:
    spec = LoRASpec(rank=rank, alpha_rule=rule)
    assert lora_alpha(spec) == pytest.approx(alpha, rel=1e-12)
    assert lora_scale(spec) == pytest.approx(alpha / rank, rel=1e-12)


def test_alpha_rules_coincide_at_rank_32_and_take_a_constant() -> None:
    assert set(ALPHA_RULES) == set(ALPHA_DEFAULT_C) == {"constant", "per_rank", "sqrt"}
    for rule in ALPHA_RULES:
        assert lora_alpha(LoRASpec(rank=32, alpha_rule=rule)) == pytest.approx(32.0, rel=1e-12)
        assert lora_scale(LoRASpec(rank=32, alpha_rule=rule)) == pytest.approx(1.0, rel=1e-12)
    assert lora_alpha(LoRASpec(rank=4, alpha_rule="constant", alpha_c=16.0)) == 16.0
    assert lora_alpha(LoRASpec(rank=4, alpha_rule="per_rank", alpha_c=2.0)) == 8.0
    assert lora_scale(LoRASpec(rank=4, alpha_rule="sqrt", alpha_c=3.0)) == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 4, "alpha_rule": "linear"}, "alpha_rule"),
        ({"rank": 4, "init": "zeros"}, "init"),
        ({"rank": 4, "init_scale": 0.0}, "init_scale"),
        ({"rank": 4, "targets": ()}, "targets"),
        ({"rank": 4, "targets": ("q_proj", "lm_head")}, "output head"),
    ],
)
def test_spec_rejects_bad_fields(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoRASpec(**fields)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- init and wrapping


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_zero_B_reproduces_tiny_base_exactly(init: str) -> None:
    model, ids_B_T = tiny_llama(), tokens_B_T()
    before_B_T_V = logits(model, ids_B_T)
    apply_lora(model, LoRASpec(rank=4, init=init), torch.Generator().manual_seed(0))
    assert all(bool((a != 0).any()) for a in lora_parameters(model)[0]), "A must be random for the test to mean anything"
    assert torch.equal(logits(model, ids_B_T), before_B_T_V)


def test_zero_B_reproduces_default_model_exactly() -> None:
    from rlora.train.models import default_model_dir, resolve_model

    if not (default_model_dir() / "model.safetensors").exists():
        pytest.skip("default model not converted (rlora.train.models.fetch_default_model)")
    model = LlamaForCausalLM.from_pretrained(resolve_model("default"), dtype=torch.float32).eval()
    ids_B_T = tokens_B_T(batch=1, length=6, vocab=model.config.vocab_size)
    before_B_T_V = logits(model, ids_B_T)
    names = apply_lora(model, LoRASpec(rank=8), torch.Generator().manual_seed(0))
    assert len(names) == 7 * model.config.num_hidden_layers
    assert torch.equal(logits(model, ids_B_T), before_B_T_V)


def test_gaussian_ab_starts_off_the_base() -> None:
    model, ids_B_T = tiny_llama(), tokens_B_T()
    before_B_T_V = logits(model, ids_B_T)
    apply_lora(model, LoRASpec(rank=4, init="gaussian_ab"), torch.Generator().manual_seed(0))
    assert (logits(model, ids_B_T) - before_B_T_V).abs().max() > 1e-3


def one_layer(d_in: int, d_out: int) -> nn.ModuleDict:
    return nn.ModuleDict({"q_proj": nn.Linear(d_in, d_out, bias=False)})


@pytest.mark.parametrize("init_scale", [1.0, 0.25])
def test_init_statistics(init_scale: float) -> None:
    d_in, d_out, rank = 1024, 512, 64
    b = init_scale / math.sqrt(d_in)
    layer = one_layer(d_in, d_out)
    apply_lora(layer, LoRASpec(rank=rank, init="default", init_scale=init_scale), torch.Generator().manual_seed(0))
    A_r_i, B_o_r = layer["q_proj"].lora_A, layer["q_proj"].lora_B
    assert A_r_i.abs().max() <= b and A_r_i.abs().max() > 0.99 * b
    assert A_r_i.std().item() == pytest.approx(b / math.sqrt(3), rel=0.02)  # std of U(-b, b)
    assert torch.count_nonzero(B_o_r) == 0

    layer = one_layer(d_in, d_out)
    apply_lora(layer, LoRASpec(rank=rank, init="gaussian", init_scale=init_scale), torch.Generator().manual_seed(0))
    assert layer["q_proj"].lora_A.std().item() == pytest.approx(b, rel=0.02)
    assert torch.count_nonzero(layer["q_proj"].lora_B) == 0

    layer = one_layer(d_in, d_out)
    apply_lora(layer, LoRASpec(rank=rank, init="gaussian_ab", init_scale=init_scale), torch.Generator().manual_seed(0))
    assert layer["q_proj"].lora_A.std().item() == pytest.approx(b, rel=0.02)
    assert layer["q_proj"].lora_B.std().item() == pytest.approx(init_scale / math.sqrt(rank), rel=0.02)


def test_same_generator_seed_gives_same_adapter() -> None:
    a, b = tiny_llama(), tiny_llama()
    apply_lora(a, LoRASpec(rank=4, init="gaussian_ab"), torch.Generator().manual_seed(7))
    apply_lora(b, LoRASpec(rank=4, init="gaussian_ab"), torch.Generator().manual_seed(7))
    for (ka, va), (kb, vb) in zip(lora_state_dict(a).items(), lora_state_dict(b).items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_only_lora_parameters_train() -> None:
    model = tiny_llama()
    names = apply_lora(model, LoRASpec(rank=4))
    assert len(names) == 7 * N_LAYERS
    assert {n.split(".")[-1] for n in names} == set(TARGETS_ALL_LINEAR)
    assert not isinstance(model.lm_head, LoRALinear)
    A_list, B_list = lora_parameters(model)
    assert len(A_list) == len(B_list) == 7 * N_LAYERS
    assert all(a.shape[0] == 4 and b.shape[1] == 4 for a, b in zip(A_list, B_list, strict=True))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in A_list + B_list}
    assert all(p.dtype == torch.float32 for p in A_list + B_list)
    keys = list(lora_state_dict(model))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert keys[1] == "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert len(keys) == 2 * 7 * N_LAYERS


def test_targets_subset_and_errors() -> None:
    model = tiny_llama()
    names = apply_lora(model, LoRASpec(rank=2, targets=("q_proj", "v_proj")))
    assert len(names) == 2 * N_LAYERS
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRASpec(rank=2))
    with pytest.raises(ValueError, match=r"no nn.Linear.*LoRASpec\(rank=2"):
        apply_lora(tiny_llama(), LoRASpec(rank=2, targets=("embed_tokens", "c_attn")))


# ----------------------------------------------------------------------------- forward


def test_forward_matches_manual_computation() -> None:
    layer = one_layer(48, 40)
    spec = LoRASpec(rank=6, alpha_rule="sqrt")
    apply_lora(layer, spec)
    randomize_lora(layer)
    m = layer["q_proj"]
    x_B_T_I = torch.randn(3, 5, 48)
    W_O_I = m.base.weight
    manual_B_T_O = x_B_T_I @ W_O_I.T + lora_scale(spec) * (x_B_T_I @ m.lora_A.T @ m.lora_B.T)
    torch.testing.assert_close(m(x_B_T_I), manual_B_T_O, rtol=1e-5, atol=1e-5)


def test_bf16_base_keeps_float32_adapter() -> None:
    layer = one_layer(48, 40).to(torch.bfloat16)
    spec = LoRASpec(rank=6)
    apply_lora(layer, spec)
    randomize_lora(layer)
    m = layer["q_proj"]
    assert m.base.weight.dtype == torch.bfloat16 and m.lora_A.dtype == m.lora_B.dtype == torch.float32
    x_B_T_I = torch.randn(3, 5, 48).to(torch.bfloat16)
    y_B_T_O = m(x_B_T_I)
    assert y_B_T_O.dtype == torch.bfloat16
    x32 = x_B_T_I.float()
    manual_B_T_O = x32 @ m.base.weight.float().T + lora_scale(spec) * (x32 @ m.lora_A.T @ m.lora_B.T)
    torch.testing.assert_close(y_B_T_O.float(), manual_B_T_O, rtol=2e-2, atol=2e-2)
    y_B_T_O.float().square().sum().backward()
    assert m.lora_A.grad is not None and m.lora_A.grad.dtype == torch.float32
    assert m.lora_B.grad is not None and m.base.weight.grad is None


# ----------------------------------------------------------------------------- PEFT round trip


def test_peft_loads_our_export(tmp_path: Path) -> None:
    from peft import PeftModel

    base, ids_B_T = tiny_llama(), tokens_B_T()
    ours = copy.deepcopy(base)
    spec = LoRASpec(rank=4, alpha_rule="sqrt", init="gaussian")  # alpha = sqrt(32) * sqrt(4) = 8 * sqrt(2), not an integer
    apply_lora(ours, spec)
    randomize_lora(ours)
    out = save_peft_adapter(ours, spec, tmp_path / "adapter", base_model="tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == lora_alpha(spec) and config["use_rslora"] is False and config["r"] == 4
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == "tiny"

    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    ours_B_T_V = logits(ours, ids_B_T)
    assert (ours_B_T_V - logits(tiny_llama(), ids_B_T)).abs().max() > 1e-2, "the adapter must move the logits"
    torch.testing.assert_close(logits(peft_model, ids_B_T), ours_B_T_V, rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_we_load_peft_save_pretrained(tmp_path: Path, use_rslora: bool) -> None:
    from peft import LoraConfig, get_peft_model

    ids_B_T = tokens_B_T()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=use_rslora)
    peft_model = get_peft_model(tiny_llama(), config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(str(tmp_path / "peft"))

    ours = tiny_llama()
    spec = load_peft_adapter(ours, tmp_path / "peft")
    assert spec.rank == 4 and spec.alpha_rule == ("sqrt" if use_rslora else "constant") and spec.alpha_c == 8.0
    assert len(lora_parameters(ours)[0]) == 3 * N_LAYERS
    torch.testing.assert_close(logits(ours, ids_B_T), logits(peft_model, ids_B_T), rtol=0, atol=1e-5)


def test_round_trip_keeps_exact_spec_and_weights(tmp_path: Path) -> None:
    spec = LoRASpec(rank=3, alpha_rule="per_rank", alpha_c=0.5, init="gaussian_ab", init_scale=0.1, targets=("o_proj", "up_proj"))
    model = tiny_llama()
    apply_lora(model, spec, torch.Generator().manual_seed(0))
    save_peft_adapter(model, spec, tmp_path / "a", base_model="tiny")

    fresh = tiny_llama()  # wrapped by the loader
    assert load_peft_adapter(fresh, tmp_path / "a") == spec
    wrapped = tiny_llama()  # already wrapped, zero B
    apply_lora(wrapped, spec)
    assert load_peft_adapter(wrapped, tmp_path / "a") == spec
    for loaded in (fresh, wrapped):
        for (k, v), (k2, v2) in zip(lora_state_dict(model).items(), lora_state_dict(loaded).items(), strict=True):
            assert k == k2 and torch.equal(v, v2)


def test_save_in_bfloat16(tmp_path: Path) -> None:
    model, spec = tiny_llama(), LoRASpec(rank=2)
    apply_lora(model, spec)
    out = save_peft_adapter(model, spec, tmp_path / "a", base_model="tiny", dtype=torch.bfloat16)
    with safe_open(out / "adapter_model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- atomic save, errors


def test_save_is_atomic_and_overwrites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, spec = tiny_llama(), LoRASpec(rank=2)
    apply_lora(model, spec)
    out = save_peft_adapter(model, spec, tmp_path / "adapter", base_model="tiny")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    randomize_lora(model)
    save_peft_adapter(model, spec, tmp_path / "adapter", base_model="tiny")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], "no temp or old directory may be left behind"
    reloaded = tiny_llama()
    load_peft_adapter(reloaded, out)
    assert torch.equal(lora_parameters(reloaded)[1][0], lora_parameters(model)[1][0])

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    before = (out / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(lora, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(model, spec, tmp_path / "adapter", base_model="tiny")
    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(model, spec, tmp_path / "never", base_model="tiny")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_save_rejects_a_spec_that_is_not_the_models(tmp_path: Path) -> None:
    model = tiny_llama()
    apply_lora(model, LoRASpec(rank=2))
    with pytest.raises(AssertionError, match="rank 2"):
        save_peft_adapter(model, LoRASpec(rank=4), tmp_path / "a", base_model="tiny")


def test_load_errors_name_the_file_and_key(tmp_path: Path) -> None:
    model, spec = tiny_llama(), LoRASpec(rank=2)
    apply_lora(model, spec)
    out = save_peft_adapter(model, spec, tmp_path / "a", base_model="tiny")

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(tiny_llama(), tmp_path / "missing")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "adapter_config.json").write_text((out / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_peft_adapter(tiny_llama(), tmp_path / "no_weights")

    rank4 = tiny_llama()
    apply_lora(rank4, LoRASpec(rank=4))
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight has shape \(2, 64\).*\(4, 64\)"):
        load_peft_adapter(rank4, out)

    other_alpha = tiny_llama()
    apply_lora(other_alpha, LoRASpec(rank=2, alpha_c=8.0))
    with pytest.raises(ValueError, match="scale"):
        load_peft_adapter(other_alpha, out)

    fewer = tiny_llama()
    apply_lora(fewer, LoRASpec(rank=2, targets=("q_proj",)))
    with pytest.raises(ValueError, match="no LoRA layer"):
        load_peft_adapter(fewer, out)

    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(tiny_llama(), out)
