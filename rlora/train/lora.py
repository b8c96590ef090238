"""LoRA written out: the parametrization, its alpha rules and inits, and PEFT-layout export.

Parametrization. Every wrapped linear layer y = W x keeps W frozen and learns a low-rank update:

    y = W x + (alpha / r) * B A x,        A: (r, d_in),  B: (d_out, r),  scale = alpha / r

A and B are float32 whatever the base dtype (a bf16 base is fine: the update is computed in
float32 and cast back to the activation dtype before it is added). There is no dropout and no
bias on the update. Only linear layers are wrapped, never `lm_head` or the embeddings (they are
tied in the default model, so an update to one would silently move the other).

Alpha rules. `alpha` is a function of the rank, chosen by `LoRASpec.alpha_rule`:

    "constant": alpha = c            (c = 32, the blog's setting)     scale = 32 / r
    "per_rank": alpha = c * r        (c = 1)                          scale = 1
    "sqrt":     alpha = c * sqrt(r)  (c = 32 / sqrt(32), rsLoRA)      scale = c / sqrt(r)

The default constants make all three give alpha = 32 (scale 1) at r = 32, so a learning rate
tuned at r = 32 means the same under every rule there, and the rules differ only in how the
scale moves with rank. That is what decides whether the best learning rate moves with rank.
With B = 0 at init and Adam, each entry of B moves by about lr per step whatever the gradient's
size, and the r rank-one terms of B A add up coherently, so early in training B A grows like
r * lr; multiplied by scale it grows like alpha * lr. Under "constant" (the 1/r factor) the
early update is therefore independent of rank and so, approximately, is the best learning rate;
"LoRA Without Regret" finds the early learning curves of different ranks nearly identical under
this rule. The argument holds only while B is small, so over a whole run the independence is
approximate, not exact. Under "per_rank" the early update grows like r * lr, so the best
learning rate should fall roughly like 1/r; under "sqrt" like 1/sqrt(r). Comparing ranks at a
fixed learning rate therefore measures a different thing under each rule.

Inits (`INITS`, scaled by `LoRASpec.init_scale`; all sampled in float32 on the generator's
device, CPU by default, so one seed gives the same adapter on CPU and GPU):

    "default":     A ~ U(-b, b), b = init_scale / sqrt(d_in); B = 0. At init_scale = 1 this is
                   PEFT's default (kaiming_uniform with a = sqrt(5) gives exactly 1 / sqrt(d_in)).
                   B = 0 means the model starts exactly at the base model.
    "gaussian":    A ~ N(0, (init_scale / sqrt(d_in))^2); B = 0. Starts at the base model.
                   (PEFT's own "gaussian" init uses std 1 / r for A, not this.)
    "gaussian_ab": A as in "gaussian" and B ~ N(0, (init_scale / sqrt(r))^2). An ablation: the
                   model NO LONGER starts at the base model. The update B A x has an rms of about
                   init_scale^2 * rms(x) before the scale, so at init_scale = 1 and scale = 1 it
                   is as large as W x; use a small init_scale to perturb the start only slightly.

PEFT compatibility. `save_peft_adapter` writes the standard PEFT layout that PEFT and vLLM load:
`adapter_config.json` (peft_type LORA, r, lora_alpha, use_rslora false, bias none, dropout 0,
target_modules) and `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_{A,B}.weight`. The alpha rule is baked into `lora_alpha`
(with use_rslora false, PEFT's scale lora_alpha / r equals ours exactly). What PEFT's config
cannot hold (the alpha rule and its constant, the init, init_scale) is kept in the safetensors
metadata under `rlora_lora_spec`, which PEFT and vLLM ignore, so `load_peft_adapter` returns
the exact spec of our own adapters. It also reads adapters saved by PEFT, including rsLoRA ones
(use_rslora true with lora_alpha c is our "sqrt" rule with alpha_c = c); it refuses, naming the
field, what this module cannot represent: per-module ranks or alphas (rank_pattern,
alpha_pattern), DoRA, LoRA biases, modules_to_save, fan_in_fan_out, layers_to_transform, and
weights in the old `adapter_model.bin` format.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = [
    "ALPHA_DEFAULT_C",
    "ALPHA_RULES",
    "INITS",
    "TARGETS_ALL_LINEAR",
    "LoRALinear",
    "LoRASpec",
    "adapter_disabled",
    "apply_lora",
    "load_peft_adapter",
    "lora_alpha",
    "lora_parameters",
    "lora_scale",
    "lora_state_dict",
    "save_peft_adapter",
]

TARGETS_ALL_LINEAR: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
SPEC_METADATA_KEY = "rlora_lora_spec"
# Modules that must never be wrapped: the output head (tied to the embeddings in the default model).
NEVER_WRAP: tuple[str, ...] = ("lm_head",)


# ----------------------------------------------------------------------------- alpha rules


def alpha_constant(rank: int, c: float) -> float:
    """alpha = c: scale = c / r, the blog's rule (early updates independent of rank)."""
    return float(c)


def alpha_per_rank(rank: int, c: float) -> float:
    """alpha = c * r: scale = c whatever the rank."""
    return float(c * rank)


def alpha_sqrt(rank: int, c: float) -> float:
    """alpha = c * sqrt(r): scale = c / sqrt(r), rsLoRA."""
    return float(c * math.sqrt(rank))


ALPHA_RULES: dict[str, Callable[[int, float], float]] = {
    "constant": alpha_constant,
    "per_rank": alpha_per_rank,
    "sqrt": alpha_sqrt,
}

# Chosen so that all three rules give alpha = 32 (scale = 1) at r = 32.
ALPHA_DEFAULT_C: dict[str, float] = {
    "constant": 32.0,
    "per_rank": 1.0,
    "sqrt": 32.0 / math.sqrt(32.0),
}


# ----------------------------------------------------------------------------- inits


def init_default(d_in: int, d_out: int, rank: int, init_scale: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A ~ U(-b, b), b = init_scale / sqrt(d_in); B = 0 (PEFT's default at init_scale 1)."""
    bound = init_scale / math.sqrt(d_in)
    device = generator.device if generator is not None else torch.device("cpu")
    A_r_i = torch.empty(rank, d_in, dtype=torch.float32, device=device).uniform_(-bound, bound, generator=generator)
    B_o_r = torch.zeros(d_out, rank, dtype=torch.float32, device=device)
    return A_r_i, B_o_r


def init_gaussian(d_in: int, d_out: int, rank: int, init_scale: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A ~ N(0, (init_scale / sqrt(d_in))^2); B = 0."""
    std = init_scale / math.sqrt(d_in)
    device = generator.device if generator is not None else torch.device("cpu")
    A_r_i = torch.empty(rank, d_in, dtype=torch.float32, device=device).normal_(0.0, std, generator=generator)
    B_o_r = torch.zeros(d_out, rank, dtype=torch.float32, device=device)
    return A_r_i, B_o_r


def init_gaussian_ab(d_in: int, d_out: int, rank: int, init_scale: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A ~ N(0, (init_scale / sqrt(d_in))^2), B ~ N(0, (init_scale / sqrt(r))^2): starts off the base."""
    A_r_i, B_o_r = init_gaussian(d_in, d_out, rank, init_scale, generator)
    B_o_r.normal_(0.0, init_scale / math.sqrt(rank), generator=generator)
    return A_r_i, B_o_r


# Each init takes (d_in, d_out, rank, init_scale, generator) and returns float32 (A (r, d_in), B (d_out, r)).
INITS: dict[str, Callable[[int, int, int, float, torch.Generator | None], tuple[torch.Tensor, torch.Tensor]]] = {
    "default": init_default,
    "gaussian": init_gaussian,
    "gaussian_ab": init_gaussian_ab,
}


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True, kw_only=True)
class LoRASpec:
    """What a LoRA adapter is: its rank, how alpha follows the rank, its init and where it goes."""

    rank: int
    """r >= 1, the same for every wrapped layer."""
    alpha_rule: str = "constant"
    """Key of ALPHA_RULES: how alpha depends on the rank."""
    alpha_c: float | None = None
    """The rule's constant; None means ALPHA_DEFAULT_C[alpha_rule] (alpha = 32 at r = 32)."""
    init: str = "default"
    """Key of INITS."""
    init_scale: float = 1.0
    """Multiplies the init std / bound of A (and of B for inits that draw B)."""
    targets: tuple[str, ...] = TARGETS_ALL_LINEAR
    """Module-name suffixes to wrap (a name matches if it equals a target or ends with '.' + target)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoRASpec.rank must be an int >= 1, got {self.rank!r}")
        if self.alpha_rule not in ALPHA_RULES:
            raise ValueError(f"LoRASpec.alpha_rule {self.alpha_rule!r} is not one of {sorted(ALPHA_RULES)}")
        if self.init not in INITS:
            raise ValueError(f"LoRASpec.init {self.init!r} is not one of {sorted(INITS)}")
        if not self.init_scale > 0:
            raise ValueError(f"LoRASpec.init_scale must be > 0, got {self.init_scale!r}")
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"LoRASpec.targets must be a non-empty tuple of module-name suffixes, got {self.targets!r}")
        # Accept a list from a config file, but keep the frozen spec hashable.
        object.__setattr__(self, "targets", tuple(self.targets))
        never = [t for t in self.targets if t.split(".")[-1] in NEVER_WRAP]
        if never:
            raise ValueError(f"LoRASpec.targets may not include the output head: {never}")


def lora_alpha(spec: LoRASpec) -> float:
    """alpha from the spec's rule and constant (the rule's default constant when alpha_c is None)."""
    c = ALPHA_DEFAULT_C[spec.alpha_rule] if spec.alpha_c is None else spec.alpha_c
    return ALPHA_RULES[spec.alpha_rule](spec.rank, c)


def lora_scale(spec: LoRASpec) -> float:
    """The factor in front of B A x: alpha / r."""
    return lora_alpha(spec) / spec.rank


# ----------------------------------------------------------------------------- the layer


class LoRALinear(nn.Module):
    """A frozen nn.Linear `base` plus scale * B A, with A (r, d_in) and B (d_out, r) in float32."""

    def __init__(self, base: nn.Linear, rank: int, scale: float) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.scale = scale
        device = base.weight.device
        # Zeros until an init fills them: a model built only to load an adapter draws no random numbers.
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=device))
        self.enabled = True  # False: the layer is its base alone (`adapter_disabled`, the reference policy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        # The factors (float32 masters) are cast to the activations' dtype, never x to theirs: a
        # cast copy of x would be saved for backward beside the base layer's own, doubling the
        # activation memory of every wrapped layer. addmm adds scale * (x A^T) B^T into y in one
        # pass instead of three elementwise ones over (tokens x d_out).
        h = nn.functional.linear(x, self.lora_A.to(x.dtype))
        y2 = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]).to(y.dtype), self.lora_B.to(y.dtype).t(), alpha=self.scale)
        return y2.view_as(y)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model, by module path, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Inside, every LoRA layer of `model` computes its frozen base alone: the base model, with no copy of its weights."""
    modules = list(lora_modules(model).values())
    assert modules, "adapter_disabled needs a model with LoRA layers"
    previous = [m.enabled for m in modules]  # restored as found, so the context nests
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m, enabled in zip(modules, previous):
            m.enabled = enabled


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _wrap(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Replace each target nn.Linear by a LoRALinear with zero A and B; freeze everything else."""
    if lora_modules(model):
        raise ValueError(f"model already has LoRA layers; apply_lora runs once per model (spec {spec})")
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(name, spec.targets) and name.split(".")[-1] not in NEVER_WRAP]
    if not names:
        raise ValueError(f"no nn.Linear module name ends with any of {spec.targets} (spec {spec})")
    model.requires_grad_(False)
    scale = lora_scale(spec)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), spec.rank, scale))
    return names


def apply_lora(model: nn.Module, spec: LoRASpec, generator: torch.Generator | None = None) -> list[str]:
    """Wrap every target nn.Linear in a LoRALinear initialised by spec.init; freeze the rest.

    Returns the wrapped module names. Raises ValueError naming the spec when nothing matched.
    Random numbers come from `generator` (CPU's global generator when None), on its device.
    """
    names = _wrap(model, spec)
    init = INITS[spec.init]
    with torch.no_grad():
        for m in lora_modules(model).values():
            A_r_i, B_o_r = init(m.in_features, m.out_features, spec.rank, spec.init_scale, generator)
            m.lora_A.copy_(A_r_i)
            m.lora_B.copy_(B_o_r)
    return names


def lora_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(every A, every B) in module order, so that A and B can get different learning rates."""
    modules = lora_modules(model).values()
    return [m.lora_A for m in modules], [m.lora_B for m in modules]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A and B (detached, not copied) under PEFT's key names."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        out[f"{KEY_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach()
        out[f"{KEY_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach()
    return out


# ----------------------------------------------------------------------------- export


def _spec_to_json(spec: LoRASpec) -> str:
    return json.dumps(dataclasses.asdict(spec))


def _spec_from_json(text: str) -> LoRASpec:
    fields = json.loads(text)
    fields["targets"] = tuple(fields["targets"])
    return LoRASpec(**fields)


def _json_number(x: float) -> int | float:
    # 32 rather than 32.0 for readers that expect an int; a non-integral alpha stays an exact float.
    return int(x) if float(x).is_integer() else x


def peft_config(spec: LoRASpec, base_model: str) -> dict[str, object]:
    """The adapter_config.json PEFT and vLLM read for this spec."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": _json_number(lora_alpha(spec)),
        "use_rslora": False,  # the alpha rule is already in lora_alpha
        "target_modules": list(spec.targets),
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _swap_dirs(new: Path, old: Path) -> None:
    """Put directory `new` at path `old`, leaving the previous contents of `old` at path `new`.

    On Linux renameat2(RENAME_EXCHANGE) swaps the two atomically, so there is no moment at which
    `old` is missing; elsewhere (or on filesystems without it) `old` is moved aside first.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = getattr(libc, "renameat2", None)
        if renameat2 is not None:
            at_fdcwd, rename_exchange = -100, 2
            if renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(old), rename_exchange) == 0:
                return
    aside = new.with_name(new.name + ".old")
    os.rename(old, aside)
    os.rename(new, old)
    os.rename(aside, new)


def save_peft_adapter(model: nn.Module, spec: LoRASpec, out_dir: str | Path, base_model: str, dtype: torch.dtype = torch.float32) -> Path:
    """Write the model's LoRA weights as a PEFT adapter directory; return its path.

    The files go to a fresh directory beside `out_dir`, which then replaces `out_dir` in one
    rename, so a reader sees the old adapter or the new one, never half of one.
    """
    out_dir = Path(out_dir)
    modules = lora_modules(model)
    assert modules, f"model has no LoRA layers to save (spec {spec})"
    scale = lora_scale(spec)
    for name, m in modules.items():
        assert m.rank == spec.rank and math.isclose(m.scale, scale), (
            f"{name} has rank {m.rank}, scale {m.scale}; spec {spec} says rank {spec.rank}, scale {scale}"
        )
    tensors = {k: v.detach().to(dtype).cpu().contiguous() for k, v in lora_state_dict(model).items()}  # cast on the device: fewer bytes to copy
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", SPEC_METADATA_KEY: _spec_to_json(spec)})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config(spec, base_model), indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a sampler run by another user must read it
        if out_dir.exists():
            _swap_dirs(tmp, out_dir)
        else:
            os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous adapter, or the new one after a failure
    return out_dir


# ----------------------------------------------------------------------------- import

# PEFT config fields this module cannot represent, with the value that means "not used".
UNSUPPORTED_PEFT_FIELDS: dict[str, object] = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
}


def _spec_from_peft_config(config: dict[str, object], module_names: list[str], config_path: Path) -> LoRASpec:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
    for key, unused in UNSUPPORTED_PEFT_FIELDS.items():
        value = config.get(key, unused)
        if value not in (unused, None, False, {}, []):
            raise ValueError(f"{config_path}: {key}={value!r} is not supported by rlora.train.lora")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: bias={config['bias']!r} is not supported by rlora.train.lora (only 'none')")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ValueError(f"{config_path}: missing {key!r}")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        # PEFT also allows a regex string; the wrapped modules' own names say the same thing.
        targets = sorted({name.split(".")[-1] for name in module_names})
    # With use_rslora PEFT's scale is lora_alpha / sqrt(r): our "sqrt" rule with c = lora_alpha.
    rule = "sqrt" if config.get("use_rslora", False) else "constant"
    r, lora_alpha = config["r"], config["lora_alpha"]
    assert isinstance(r, int) and isinstance(lora_alpha, (int, float)), f"adapter_config.json: r={r!r}, lora_alpha={lora_alpha!r}"
    return LoRASpec(rank=r, alpha_rule=rule, alpha_c=float(lora_alpha), targets=tuple(targets))


def _module_name(key: str, weights_path: Path) -> tuple[str, str]:
    """'base_model.model.<path>.lora_A.weight' -> (<path>, 'lora_A')."""
    for part in ("lora_A", "lora_B"):
        suffix = f".{part}.weight"
        if key.startswith(KEY_PREFIX) and key.endswith(suffix):
            return key[len(KEY_PREFIX) : -len(suffix)], part
    raise ValueError(f"{weights_path}: key {key!r} is not '{KEY_PREFIX}<module>.lora_{{A,B}}.weight'")


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> LoRASpec:
    """Load a PEFT LoRA adapter (ours or PEFT's) into `model`; return its spec.

    A model without LoRA layers is wrapped first (with the adapter's rank and targets); a model
    already wrapped must have the adapter's rank, scale and wrapped modules. Errors name the file
    and key at fault.
    """
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in adapter directory {adapter_dir}")
    if not weights_path.is_file():
        extra = " (adapter_model.bin is not supported; re-save with safetensors)" if (adapter_dir / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in adapter directory {adapter_dir}{extra}")
    config = json.loads(config_path.read_text())

    with safe_open(weights_path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, part = _module_name(key, weights_path)
        parts.setdefault(name, {})[part] = tensor
    for name, pair in parts.items():
        for part in ("lora_A", "lora_B"):
            if part not in pair:
                raise ValueError(f"{weights_path}: missing key {KEY_PREFIX}{name}.{part}.weight")

    spec = _spec_from_peft_config(config, list(parts), config_path)
    if SPEC_METADATA_KEY in metadata:
        ours = _spec_from_json(metadata[SPEC_METADATA_KEY])
        if ours.rank != spec.rank or not math.isclose(lora_scale(ours), lora_scale(spec)):
            raise ValueError(f"{weights_path}: metadata spec {ours} disagrees with r / lora_alpha in {config_path}")
        spec = ours

    if not lora_modules(model):
        _wrap(model, spec)
    modules = lora_modules(model)
    missing = sorted(set(modules) - set(parts))
    if missing:
        raise ValueError(f"{weights_path}: no weights for LoRA module(s) {missing[:3]}{'...' if len(missing) > 3 else ''}")
    unknown = sorted(set(parts) - set(modules))
    if unknown:
        raise ValueError(f"{weights_path}: key(s) for module(s) the model has no LoRA layer for: {unknown[:3]}")
    scale = lora_scale(spec)
    with torch.no_grad():
        for name, m in modules.items():
            for part in ("lora_A", "lora_B"):
                param, tensor = getattr(m, part), parts[name][part]
                if param.shape != tensor.shape:
                    raise ValueError(
                        f"{weights_path}: {KEY_PREFIX}{name}.{part}.weight has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(param.shape)} (rank {m.rank})"
                    )
            if not math.isclose(m.scale, scale):
                raise ValueError(f"{config_path}: adapter scale {scale:g} (spec {spec}) != the model's {m.scale:g} at {name}")
        for name, m in modules.items():
            m.lora_A.copy_(parts[name]["lora_A"])
            m.lora_B.copy_(parts[name]["lora_B"])
    return spec
