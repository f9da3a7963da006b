"""Where each architecture keeps W_out, the FFN output projection that patches add to.

A neuron is one coordinate of W_out's *input* q ([..., intermediate]); its output direction is
column i of an nn.Linear weight ([hidden, intermediate]) or row i of GPT-2's Conv1D weight
([intermediate, hidden]). Patches store deltas canonically as [k, hidden] for every
architecture, so only merge and PEFT export need the orientation.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError
from .patch import BaseModelInfo


@dataclass(frozen=True)
class ArchSpec:
    """Where W_out lives for one model_type, relative to ``model.base_model``."""

    layers_path: str  # dotted path of the decoder-layer ModuleList
    w_out_path: str  # dotted path of W_out inside one decoder layer
    conv1d: bool = False  # GPT-2 style Conv1D: weight is [intermediate, hidden]


_LLAMA_LIKE = ArchSpec("layers", "mlp.down_proj")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "gpt2": ArchSpec("h", "mlp.c_proj", conv1d=True),
    "gptj": ArchSpec("h", "mlp.fc_out"),
    "gpt_neox": ArchSpec("layers", "mlp.dense_4h_to_h"),
    "opt": ArchSpec("decoder.layers", "fc2"),
}


@dataclass(frozen=True)
class ModelArch:
    """The resolved W_out modules of one concrete model."""

    model_type: str
    spec: ArchSpec
    w_out: tuple[nn.Module, ...]  # one per layer, in order
    hidden_size: int
    intermediate_size: int
    decoder_layers: tuple[nn.Module, ...] = ()  # the blocks that hold w_out, in order
    decoder: nn.Module | None = None  # the module that runs the blocks (sees the KV cache)

    @property
    def num_layers(self) -> int:
        return len(self.w_out)

    def column(self, layer: int, neuron_indices: torch.Tensor) -> torch.Tensor:
        """W_out's output directions for ``neuron_indices`` as [k, hidden] (a copy)."""
        weight = self.w_out[layer].weight
        rows = weight[neuron_indices] if self.spec.conv1d else weight[:, neuron_indices].T
        return rows.detach().clone()


def supported_model_types() -> list[str]:
    """The model_type values neuronpatch can patch."""
    return sorted(ARCHITECTURES)


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no config.model_type; neuronpatch patches HuggingFace "
            f"causal LMs. Supported model types: {', '.join(supported_model_types())}."
        )
    return model_type


def resolve(model: nn.Module) -> ModelArch:
    """Find W_out in every layer of ``model``; raise UnsupportedModelError if unknown."""
    model_type = _model_type(model)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({type(model).__name__}) is not supported. "
            f"Supported model types: {', '.join(supported_model_types())}. "
            "To add one, register an ArchSpec in neuronpatch.arch.ARCHITECTURES."
        )
    base = getattr(model, "base_model", model)
    try:
        layers = base.get_submodule(spec.layers_path)
        w_out = tuple(layer.get_submodule(spec.w_out_path) for layer in layers)
    except AttributeError as exc:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model_type!r}) does not have the expected "
            f"layout {spec.layers_path}[i].{spec.w_out_path}: {exc}"
        ) from exc
    weight = w_out[0].weight
    # Linear: [hidden, inter]; Conv1D: [inter, hidden]
    intermediate, hidden = weight.shape if spec.conv1d else weight.shape[::-1]
    owner, _, _ = spec.layers_path.rpartition(".")
    decoder = base.get_submodule(owner) if owner else base
    return ModelArch(
        model_type, spec, w_out, int(hidden), int(intermediate), tuple(layers), decoder
    )


def device_of(model: nn.Module) -> torch.device:
    """Where the model's (first) parameters live: where its inputs should go."""
    return next(model.parameters()).device


def cache_kwarg(model: nn.Module) -> str:
    """The name of ``model.forward``'s key/value-cache argument: transformers 5.x renamed
    ``past_key_values`` to ``cache`` (the output's attribute too)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def base_model_info(model: nn.Module) -> BaseModelInfo:
    """The identity a patch made on ``model`` records (name, model_type, sizes)."""
    arch = resolve(model)
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    return BaseModelInfo(
        name, arch.model_type, arch.num_layers, arch.hidden_size, arch.intermediate_size
    )
