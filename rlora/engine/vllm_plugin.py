"""vLLM general plugin: on the CPU platform, build rlora's grouped-GEMM LoRA wrapper.

pyproject.toml registers `register` under the `vllm.general_plugins` entry-point group, so vLLM
calls it in every process it starts (`vllm.plugins.load_general_plugins`, from `EngineArgs`, the
engine core and each worker) before any model, and so any punica wrapper, is built. vLLM picks
the wrapper class by name through `current_platform.get_punica_wrapper()`
(`vllm/lora/punica_wrapper/punica_selector.py`); `register` replaces that classmethod on the CPU
platform class only. On any other platform (CUDA, ...) it changes nothing.

`RLORA_FAST_LORA=0` keeps vLLM's stock CPU ops (the baseline for benchmarks). The variable is
read each time a wrapper is built, not at registration, so it also takes effect in a process
where the plugin was registered earlier. Calling `register` again is harmless.

See `rlora/vllm_lora_ops.py` for why the stock ops are slow and wrong for unadapted rows.
"""

from __future__ import annotations

import logging
import os

__all__ = ["FAST_LORA_ENV", "GROUPED_WRAPPER", "fast_lora_enabled", "register"]

FAST_LORA_ENV = "RLORA_FAST_LORA"
GROUPED_WRAPPER = "rlora.engine.vllm_lora_ops.GroupedPunicaWrapperCPU"
STOCK_CPU_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"

logger = logging.getLogger(__name__)


def fast_lora_enabled() -> bool:
    """False only when RLORA_FAST_LORA=0 (stock vLLM ops wanted)."""
    return os.environ.get(FAST_LORA_ENV, "1").strip() != "0"


def _select_punica_wrapper(cls: type) -> str:
    return GROUPED_WRAPPER if fast_lora_enabled() else STOCK_CPU_WRAPPER


def register() -> None:
    """Make vLLM's CPU platform build `GroupedPunicaWrapperCPU`; no-op on other platforms."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    platform_cls = type(current_platform)
    if getattr(platform_cls.get_punica_wrapper, "__func__", None) is _select_punica_wrapper:
        return  # already registered in this process
    current = platform_cls.get_punica_wrapper()
    if current != STOCK_CPU_WRAPPER:  # someone else replaced it: do not stack on top
        logger.warning("rlora: CPU punica wrapper is %s, not vLLM's; leaving it", current)
        return
    platform_cls.get_punica_wrapper = classmethod(_select_punica_wrapper)
