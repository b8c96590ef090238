"""A starting learning rate from the model's width: LoRA Without Regret's fitted rule.

    LR = base_lr * M_LoRA * (2000 / hidden_size) ** (model_pow + LoRA_pow)

with M_LoRA = 9.8 for LoRA and 1 for FullFT, and LoRA_pow = 0, both as stated in the blog: the
best LoRA learning rate is about ten times FullFT's, independently of the rank (the 1/r in
alpha / r makes the early update rank-independent, see `rlora.train.lora`).

Where the other constants come from. The blog writes the rule without its base rate and gives
no table of `model_pow`. The values here are those of `get_lr` in tinker-cookbook's
`tinker_cookbook/hyperparam_utils.py` (the blog's companion code) at commit e1024a40 (read in that
file, not recalled): base_lr = 5e-5, model_pow = 0.781 for Llama and 0.0775 for Qwen. They are
fits from Thinking Machines' own SFT sweeps, so they are estimates with those sweeps' settings
(constant alpha = 32, AdamW, their data and batch sizes) built in; `get_lr` itself uses a LoRA
multiplier of 10.0, the rounded 9.8. Later versions of that file replaced the formula with a
table of swept rates per model, so treat the output as the centre of a sweep, not its result.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BASE_LR", "LORA_MULTIPLIER", "LORA_POW", "MODEL_POW", "LRSuggestion", "suggest_lr"]

BASE_LR = 5e-5  # FullFT learning rate at hidden_size 2000 (tinker-cookbook get_lr, commit e1024a40)
LORA_MULTIPLIER = 9.8  # M_LoRA, the blog's fit (tinker-cookbook rounds it to 10.0)
LORA_POW = 0.0  # the blog: no extra width dependence for LoRA
MODEL_POW: dict[str, float] = {  # tinker-cookbook get_lr, commit e1024a40
    "llama": 0.781,
    "qwen": 0.0775,
}


@dataclass(frozen=True)
class LRSuggestion:
    lr: float
    hidden_size: int
    family: str
    lora: bool
    multiplier: float  # M_LoRA, or 1 for FullFT
    exponent: float  # model_pow + LoRA_pow

    def explain(self) -> str:
        kind = "LoRA" if self.lora else "FullFT"
        return (
            f"{kind} lr for a {self.family} model with hidden_size {self.hidden_size}: "
            f"{BASE_LR:g} * {self.multiplier:g} * (2000 / {self.hidden_size}) ** {self.exponent:g} = {self.lr:.3g}"
        )


def suggest_lr(hidden_size: int, family: str, lora: bool, base_lr: float = BASE_LR) -> LRSuggestion:
    """The fitted rule's learning rate; raises ValueError for an unknown family or a bad width."""
    if family not in MODEL_POW:
        raise ValueError(f"unknown model family {family!r}; the rule is fitted only for {sorted(MODEL_POW)}")
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
    multiplier = LORA_MULTIPLIER if lora else 1.0
    exponent = MODEL_POW[family] + (LORA_POW if lora else 0.0)
    lr = base_lr * multiplier * (2000 / hidden_size) ** exponent
    return LRSuggestion(lr, hidden_size, family, lora, multiplier, exponent)
