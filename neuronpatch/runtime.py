"""Applying patches to a live model through forward hooks on W_out, and merging them.

All patches applied to one layer are folded into a single (neuron_indices, deltas) pair, so
the hook costs one gather and one small matmul however many patches are stacked:

    m' = m + q[..., idx] @ D        q: [..., intermediate] (W_out's input), D: [n, hidden]

The fold is rebuilt on every apply/remove. Layers without patches carry no hook, so a model
with everything removed runs exactly the original code path.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import fingerprint
from .arch import ModelArch, resolve
from .errors import (
    ArchitectureMismatchError,
    FingerprintMismatchError,
    MergedStateError,
    PatchAlreadyAppliedError,
    PatchNotAppliedError,
)
from .patch import Patch

PatchLike = Patch | str | os.PathLike
_STATE_ATTR = "_neuronpatch_state"


@dataclass
class _LayerFold:
    """Every applied patch of one layer, summed per neuron, on W_out's device and dtype."""

    neuron_indices: torch.Tensor  # int64 [n]
    deltas: torch.Tensor  # [n, hidden]


@dataclass
class _State:
    arch: ModelArch
    patches: list[Patch] = field(default_factory=list)
    folds: dict[int, _LayerFold] = field(default_factory=dict)
    hooks: dict[int, RemovableHandle] = field(default_factory=dict)
    # layer -> (neuron_indices, original W_out directions [n, hidden]) while merged
    merged: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None


def _state(model: nn.Module) -> _State | None:
    return model.__dict__.get(_STATE_ATTR)


def load_patch(source: PatchLike) -> Patch:
    """A Patch from a Patch, a local path, or (with the hub module) an ``hf://`` address."""
    if isinstance(source, Patch):
        return source
    if isinstance(source, str) and source.startswith("hf://"):
        from .hub import load_hf

        return load_hf(source)
    if isinstance(source, (str, os.PathLike)):
        return Patch.load(source)
    raise TypeError(f"expected a Patch, a path or a list of them, got {type(source).__name__}")


def _flatten(patches: Iterable[PatchLike | Iterable[PatchLike]]) -> list[PatchLike]:
    flat: list[PatchLike] = []
    for item in patches:
        if isinstance(item, (list, tuple)):
            flat.extend(_flatten(item))
        else:
            flat.append(item)
    return flat


def check_compatible(
    patch: Patch, arch: ModelArch, model_fp: torch.Tensor | None, force: bool
) -> None:
    """Raise if ``patch`` was made for another model; with ``force``, warn about weights instead."""
    base = patch.base
    expected = (base.model_type, base.num_layers, base.hidden_size, base.intermediate_size)
    actual = (arch.model_type, arch.num_layers, arch.hidden_size, arch.intermediate_size)
    if expected != actual:
        raise ArchitectureMismatchError(
            f"{patch.label} was made for {base.describe()}, but the model is "
            f"{arch.model_type} with {arch.num_layers} layers, hidden {arch.hidden_size}, "
            f"intermediate {arch.intermediate_size}. Load the patch's base model instead."
        )
    if patch.base_fingerprint is None or model_fp is None:
        return
    dist = fingerprint.distance(model_fp, patch.base_fingerprint)
    if dist < fingerprint.TOLERANCE:
        return
    message = (
        f"{patch.label} was made for other weights than this model's: same architecture, "
        f"but the base fingerprint differs (relative distance {dist:.3g}, tolerance "
        f"{fingerprint.TOLERANCE}). Its base was {base.name_or_path!r}."
    )
    if not force:
        raise FingerprintMismatchError(message + " Pass force=True to apply it anyway.")
    warnings.warn(message + " Applying anyway because force=True.", stacklevel=3)


def apply(
    model: nn.Module, *patches: PatchLike | Iterable[PatchLike], force: bool = False
) -> nn.Module:
    """Attach patches (Patch objects, paths, or lists of them) to ``model``; all or none.

    Raises PatchAlreadyAppliedError for a patch whose content is already applied: applying an
    edit twice would double its deltas, which is never what a user means.
    """
    state = _state(model)
    if state is not None and state.merged is not None:
        raise MergedStateError(
            "the model's patches are merged into its weights; call unmerge(model) first"
        )
    loaded = [load_patch(p) for p in _flatten(patches)]
    arch = state.arch if state is not None else resolve(model)
    needs_fp = any(p.base_fingerprint is not None for p in loaded)
    model_fp = fingerprint.compute(arch) if needs_fp else None
    seen = {p.patch_id: p for p in (state.patches if state is not None else [])}
    for patch in loaded:
        check_compatible(patch, arch, model_fp, force)
        if patch.patch_id in seen:
            raise PatchAlreadyAppliedError(
                f"{patch.label} is already applied (same content as {seen[patch.patch_id].label}); "
                "applying it twice would double its deltas. Nothing was applied."
            )
        seen[patch.patch_id] = patch
    if state is None:
        state = _State(arch)
        model.__dict__[_STATE_ATTR] = state
    state.patches.extend(loaded)
    _refold(state, {layer for p in loaded for layer in p.layers})
    return model


def remove(model: nn.Module, patch: PatchLike | None = None) -> nn.Module:
    """Detach one patch (object, path or file it was loaded from), or every patch when None."""
    state = _state(model)
    if state is not None and state.merged is not None:
        raise MergedStateError(
            "the model's patches are merged into its weights; call unmerge(model) first"
        )
    if patch is None:
        if state is not None:
            _refold(state, set(state.folds), drop=list(state.patches))
        return model
    target = _find(state, patch)
    _refold(state, set(target.layers), drop=[target])
    return model


def _find(state: _State | None, patch: PatchLike) -> Patch:
    applied = state.patches if state is not None else []
    if isinstance(patch, Patch):
        match = [p for p in applied if p is patch] or [
            p for p in applied if p.patch_id == patch.patch_id
        ]
    else:
        path = os.fspath(patch)
        match = (
            [
                p
                for p in applied
                # a source may be "<bytes>" or a file deleted since: samefile would raise
                if p.source is not None
                and os.path.exists(p.source)
                and os.path.samefile(p.source, path)
            ]
            if (os.path.exists(path))
            else []
        )
        if not match and os.path.exists(path):
            wanted = Patch.load(path).patch_id
            match = [p for p in applied if p.patch_id == wanted]
    if not match:
        label = patch.label if isinstance(patch, Patch) else os.fspath(patch)
        raise PatchNotAppliedError(
            f"{label} is not applied to this model; applied: {[p.label for p in applied] or 'none'}"
        )
    return match[0]


def applied_patches(model: nn.Module) -> list[Patch]:
    """The patches applied to ``model``, in the order they were applied."""
    state = _state(model)
    return list(state.patches) if state is not None else []


@contextmanager
def applied(
    model: nn.Module, *patches: PatchLike | Iterable[PatchLike], force: bool = False
) -> Iterator[nn.Module]:
    """Apply patches for the duration of a ``with`` block, then remove exactly those."""
    before = {p.patch_id for p in applied_patches(model)}
    apply(model, *patches, force=force)
    added = [p for p in applied_patches(model) if p.patch_id not in before]
    try:
        yield model
    finally:
        for patch in added:
            remove(model, patch)


def merge(model: nn.Module) -> nn.Module:
    """Bake the applied patches into W_out (hooks detached); ``unmerge`` restores it bitwise."""
    state = _state(model)
    if state is None or state.merged is not None:
        return model
    state.merged = {}
    with torch.no_grad():
        for layer, fold in state.folds.items():
            weight = state.arch.w_out[layer].weight
            idx = fold.neuron_indices
            if state.arch.spec.conv1d:  # weight [inter, hidden]
                state.merged[layer] = (idx, weight[idx].clone())
                weight[idx] += fold.deltas
            else:  # weight [hidden, inter]
                state.merged[layer] = (idx, weight[:, idx].T.clone())
                weight[:, idx] += fold.deltas.T
    for handle in state.hooks.values():
        handle.remove()
    state.hooks.clear()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore W_out's original entries exactly and run the patches through hooks again."""
    state = _state(model)
    if state is None or state.merged is None:
        return model
    with torch.no_grad():
        for layer, (idx, original) in state.merged.items():
            weight = state.arch.w_out[layer].weight
            if state.arch.spec.conv1d:
                weight[idx] = original
            else:
                weight[:, idx] = original.T
    state.merged = None
    for layer in state.folds:
        state.hooks[layer] = state.arch.w_out[layer].register_forward_hook(_hook(state, layer))
    return model


def is_merged(model: nn.Module) -> bool:
    """Whether the model's applied patches are currently merged into its weights."""
    state = _state(model)
    return state is not None and state.merged is not None


def _refold(state: _State, layers: set[int], drop: list[Patch] = ()) -> None:
    """Recompute the fold of ``layers`` after adding or dropping patches; add/remove hooks."""
    if drop:
        dropped = {id(p) for p in drop}
        state.patches = [p for p in state.patches if id(p) not in dropped]
    for layer in sorted(layers):
        parts = [p.layers[layer] for p in state.patches if layer in p.layers]
        if not parts:
            state.folds.pop(layer, None)
            handle = state.hooks.pop(layer, None)
            if handle is not None:
                handle.remove()
            continue
        weight = state.arch.w_out[layer].weight
        idx = torch.cat([ld.neuron_indices for ld in parts])  # [sum k]
        deltas = torch.cat([ld.deltas.float() for ld in parts])  # [sum k, hidden]
        unique, inverse = torch.unique(idx, return_inverse=True)  # [n], [sum k]
        summed = torch.zeros(len(unique), deltas.shape[1]).index_add_(
            0, inverse, deltas
        )  # [n, hidden]
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        state.folds[layer] = _LayerFold(unique.to(device), summed.to(device, weight.dtype))
        if layer not in state.hooks:
            state.hooks[layer] = state.arch.w_out[layer].register_forward_hook(_hook(state, layer))


def _hook(state: _State, layer: int):
    def add_patch(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        fold = state.folds[layer]
        q = args[0]  # [..., intermediate]
        return (
            output + q[..., fold.neuron_indices] @ fold.deltas
        )  # [..., n] @ [n, hidden] -> [..., hidden]

    return add_patch
