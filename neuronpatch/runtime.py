"""Applying patches to a live model through forward hooks on W_out, and merging them.

All patches applied to one layer are folded into a single (neuron_indices, deltas) pair, so
the hook costs one gather and one small matmul however many patches are stacked:

    m' = m + q[..., idx] @ D        q: [..., intermediate] (W_out's input), D: [n, hidden]

The fold is rebuilt on every apply/remove. Layers without patches carry no hook, so a model
with everything removed runs exactly the original code path.

Gated rows (``patches/FORMAT.md`` v2) are folded separately: a hook on each gate's layer
computes which gates are open at each position (``gates.GateBank``), and the layer's gated
fold multiplies each row's activation by its gate: ``m' += (q[..., idx_g] * open[..., col]) @ D_g``.
A pre-hook on the decoder resets the gates' state at the start of every new sequence and
keeps it across KV-cache steps.

``applied_per_row`` is the scoring form: patch ``i`` acts on batch row ``i`` only, so one
batched forward pass (or one batched generation) scores many separate edits. Its rows are not
folded: each keeps its owner row and gate column, ``m'[b] += (q[b][..., idx] * mask[b]) @ D``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
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
    GatedPatchError,
    MergedStateError,
    PatchAlreadyAppliedError,
    PatchNotAppliedError,
    PatchStateError,
)
from .gates import GateBank
from .patch import Gate, Patch

PatchLike = Patch | str | os.PathLike
_STATE_ATTR = "_neuronpatch_state"


@dataclass
class _LayerFold:
    """Every applied patch of one layer, summed per neuron, on W_out's device and dtype."""

    neuron_indices: torch.Tensor  # int64 [n]
    deltas: torch.Tensor  # [n, hidden]


@dataclass
class _GatedFold:
    """One layer's gated rows of every applied patch (rows of different gates stay apart)."""

    neuron_indices: torch.Tensor  # int64 [n]
    deltas: torch.Tensor  # [n, hidden]
    columns: torch.Tensor  # int64 [n]: each row's gate, a column of _GateState.open


@dataclass
class _RowFold:
    """One layer's rows of every patch applied per batch row (``applied_per_row``)."""

    neuron_indices: torch.Tensor  # int64 [n]
    deltas: torch.Tensor  # [n, hidden]
    owners: torch.Tensor  # int64 [n]: the batch row each row's patch acts on
    columns: torch.Tensor  # int64 [n]: the row's gate column in _GateState.open; -1: ungated


@dataclass
class _Level:
    """Gates of one layer settled together: open = (own OR any alternative) AND required."""

    either: tuple[torch.Tensor, torch.Tensor] | None  # (columns [n], alternatives [n, A])
    both: tuple[torch.Tensor, torch.Tensor] | None  # (columns [m], required columns [m])


@dataclass
class _GateState:
    """Every applied gate, numbered 0..n-1 in apply order, grouped by the layer it reads."""

    banks: dict[int, tuple[GateBank, slice]]  # gate layer -> (its gates, their columns)
    count: int
    # gate layer -> its gates that depend on others, level by level (a level depends only on
    # lower layers and earlier levels): each ``_Level`` ORs in alternatives, then ANDs requires
    levels: dict[int, list[_Level]] = field(default_factory=dict)
    hooks: list[RemovableHandle] = field(default_factory=list)
    step: dict | None = None  # set by the decoder pre-hook for the forward pass under way
    open: torch.Tensor | None = None  # bool [B, T, count] for the forward pass under way
    valid: torch.Tensor | None = None  # bool [B, T]: non-padding positions of that pass
    # float [B, count]: each gate's age (positions since its last match, inf: none) at the
    # last position of the earlier KV steps (``before``), and of this pass (``carried``,
    # filled gate layer by gate layer: the next step's ``before``)
    before: torch.Tensor | None = None
    carried: torch.Tensor | None = None


@dataclass
class _State:
    arch: ModelArch
    patches: list[Patch] = field(default_factory=list)
    folds: dict[int, _LayerFold] = field(default_factory=dict)
    gated: dict[int, _GatedFold] = field(default_factory=dict)
    gates: _GateState | None = None
    hooks: dict[int, RemovableHandle] = field(default_factory=dict)
    # layer -> (neuron_indices, original W_out directions [n, hidden]) while merged
    merged: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    # applied_per_row: patch i acts on batch row i only, its rows kept apart in ``rows``
    per_row: bool = False
    rows: dict[int, _RowFold] = field(default_factory=dict)
    batch: int | None = None  # per_row: the batch size of the forward pass under way


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
    _refuse_per_row(state, "apply more patches")
    arch = state.arch if state is not None else resolve(model)
    loaded = _checked(_flatten(patches), arch, force)
    seen = {p.patch_id: p for p in (state.patches if state is not None else [])}
    for patch in loaded:
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
    _refold(state, {layer for p in loaded for layer in p.layers}, gated=_any_gated(loaded))
    return model


def _checked(patches: Iterable[PatchLike], arch: ModelArch, force: bool) -> list[Patch]:
    """The patches loaded and each checked against the model (the fingerprint computed once)."""
    loaded = [load_patch(p) for p in patches]
    needs_fp = any(p.base_fingerprint is not None for p in loaded)
    model_fp = fingerprint.compute(arch) if needs_fp else None
    for patch in loaded:
        check_compatible(patch, arch, model_fp, force)
    return loaded


def _refuse_per_row(state: _State | None, action: str) -> None:
    if state is not None and state.per_row:
        raise PatchStateError(
            f"cannot {action} inside applied_per_row(): its patches act on one batch row each; "
            "leave the with-block first"
        )


@contextmanager
def applied_per_row(
    model: nn.Module, patches: Sequence[PatchLike], force: bool = False
) -> Iterator[nn.Module]:
    """Patch ``i`` on batch row ``i`` only, for the duration of a ``with`` block.

    For scoring many separate edits in one batch: row ``i`` of every forward pass (and every
    KV-cache step) sees the model as ``applied(model, patches[i])`` would make it, up to
    floating-point rounding (rows are not folded); rows without a patch run unedited. The
    model must have no patches applied.
    """
    state = _state(model)
    if state is not None and (state.patches or state.merged is not None):
        raise PatchStateError(
            "applied_per_row() needs a model without patches; remove(model) first "
            f"(applied: {[p.label for p in state.patches]})"
        )
    arch = state.arch if state is not None else resolve(model)
    loaded = _checked(patches, arch, force)
    state = _State(arch, patches=loaded, per_row=True)
    model.__dict__[_STATE_ATTR] = state
    # the batch size of the pass under way, for architectures that flatten [B, T] (OPT)
    decoder = arch.decoder
    batch = (
        decoder.register_forward_pre_hook(_note_batch(state), with_kwargs=True)
        if decoder is not None
        else None
    )
    try:
        _refold(state, {layer for p in loaded for layer in p.layers}, gated=_any_gated(loaded))
        yield model
    finally:
        if batch is not None:
            batch.remove()
        _refold(state, set(state.rows), drop=list(state.patches), gated=True)
        model.__dict__.pop(_STATE_ATTR, None)


def _note_batch(state: _State):
    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        state.batch = inputs.shape[0] if isinstance(inputs, torch.Tensor) else None

    return pre_hook


def _any_gated(patches: Iterable[Patch]) -> bool:
    return any(p.gates for p in patches)


def remove(model: nn.Module, patch: PatchLike | None = None) -> nn.Module:
    """Detach one patch (object, path or file it was loaded from), or every patch when None."""
    state = _state(model)
    if state is not None and state.merged is not None:
        raise MergedStateError(
            "the model's patches are merged into its weights; call unmerge(model) first"
        )
    _refuse_per_row(state, "remove patches")
    if patch is None:
        if state is not None:
            everything = set(state.folds) | set(state.gated)
            _refold(state, everything, drop=list(state.patches), gated=True)
        return model
    target = _find(state, patch)
    _refold(state, set(target.layers), drop=[target], gated=bool(target.gates))
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
    _refuse_per_row(state, "merge")
    gated = [p.label for p in state.patches if p.is_gated]
    if gated:
        raise GatedPatchError(
            f"cannot merge: {', '.join(gated)} {'is' if len(gated) == 1 else 'are'} gated, and a "
            "gate decides per position whether the deltas apply, which fixed weights cannot do. "
            "Keep gated patches as hooks (they are already applied), or remove them before merging."
        )
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


def _refold(
    state: _State, layers: set[int], drop: Iterable[Patch] = (), gated: bool = False
) -> None:
    """Recompute the folds of ``layers`` after adding or dropping patches; add/remove hooks.

    ``gated``: the change involves gated patches, so gate numbering may have changed and every
    layer holding gated rows is refolded too.
    """
    drop = list(drop)
    if drop:
        dropped = {id(p) for p in drop}
        state.patches = [p for p in state.patches if id(p) not in dropped]
    columns = _gate_columns(state)  # (patch position, gate index) -> column
    if gated:
        _rebuild_gates(state, columns)
        layers = (
            layers
            | set(state.gated)
            | {layer for p in state.patches if p.gates for layer in p.layers}
        )
    if state.per_row:
        _refold_rows(state, layers, columns)
        return
    for layer in sorted(layers):
        ungated, gated_rows = [], []
        for position, patch in enumerate(state.patches):
            ld = patch.layers.get(layer)
            if ld is None:
                continue
            if ld.gate_ids is None:
                ungated.append((ld.neuron_indices, ld.deltas))
                continue
            free = ld.gate_ids < 0
            ungated.append((ld.neuron_indices[free], ld.deltas[free]))
            for row in (~free).nonzero().flatten().tolist():
                col = columns[(position, int(ld.gate_ids[row]))]
                gated_rows.append((int(ld.neuron_indices[row]), col, ld.deltas[row]))
        weight = state.arch.w_out[layer].weight
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        ungated = [(i, d) for i, d in ungated if len(i)]
        if ungated:
            unique, summed = fold_rows(ungated, torch.float32)  # [n], [n, hidden]
            state.folds[layer] = _LayerFold(unique.to(device), summed.to(device, weight.dtype))
        else:
            state.folds.pop(layer, None)
        if gated_rows:
            state.gated[layer] = _GatedFold(
                torch.tensor([r[0] for r in gated_rows], device=device),
                torch.stack([r[2].float() for r in gated_rows]).to(device, weight.dtype),
                torch.tensor([r[1] for r in gated_rows], device=device),
            )
        else:
            state.gated.pop(layer, None)
        has_rows = layer in state.folds or layer in state.gated
        if has_rows and layer not in state.hooks:
            state.hooks[layer] = state.arch.w_out[layer].register_forward_hook(_hook(state, layer))
        elif not has_rows and layer in state.hooks:
            state.hooks.pop(layer).remove()


def _refold_rows(state: _State, layers: set[int], columns: dict[tuple[int, int], int]) -> None:
    """``_refold`` for ``applied_per_row``: every row kept, tagged with its owner row."""
    for layer in sorted(layers):
        idx, deltas, owners, cols = [], [], [], []
        for position, patch in enumerate(state.patches):
            ld = patch.layers.get(layer)
            if ld is None or not len(ld.neuron_indices):
                continue
            gate_ids = (
                ld.gate_ids.tolist() if ld.gate_ids is not None else [-1] * len(ld.neuron_indices)
            )
            idx.append(ld.neuron_indices)
            deltas.append(ld.deltas.float())
            owners += [position] * len(gate_ids)
            cols += [-1 if g < 0 else columns[(position, g)] for g in gate_ids]
        weight = state.arch.w_out[layer].weight
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        if idx:
            state.rows[layer] = _RowFold(
                torch.cat(idx).to(device),
                torch.cat(deltas).to(device, weight.dtype),
                torch.tensor(owners, device=device),
                torch.tensor(cols, device=device),
            )
        else:
            state.rows.pop(layer, None)
        if idx and layer not in state.hooks:
            state.hooks[layer] = state.arch.w_out[layer].register_forward_hook(_hook(state, layer))
        elif not idx and layer in state.hooks:
            state.hooks.pop(layer).remove()


def fold_rows(
    parts: Iterable[tuple[torch.Tensor, torch.Tensor]], accumulate: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the rows of (neuron_indices [k], deltas [k, hidden]) pairs per neuron.

    Returns the sorted unique neurons [n] and their summed deltas [n, hidden], added up in
    ``accumulate``: what applying the parts together adds to one layer.
    """
    parts = list(parts)
    idx = torch.cat([i for i, _ in parts])  # [sum k]
    deltas = torch.cat([d.to(accumulate) for _, d in parts])  # [sum k, hidden]
    unique, inverse = torch.unique(idx, return_inverse=True)  # [n], [sum k]
    summed = torch.zeros(len(unique), deltas.shape[1], dtype=accumulate)
    return unique, summed.index_add_(0, inverse, deltas)  # [n, hidden]


def _gate_columns(state: _State) -> dict[tuple[int, int], int]:
    """Number the applied gates 0..n-1 by the layer they read, then apply order.

    (patch position, gate index) -> column. The gates of one layer get consecutive
    columns, so each gate hook writes one slice of ``_GateState.open``.
    """
    keys = sorted(
        (gate.layer, position, g)
        for position, patch in enumerate(state.patches)
        for g, gate in enumerate(patch.gates)
    )
    return {(position, g): col for col, (_, position, g) in enumerate(keys)}


def _rebuild_gates(state: _State, columns: dict[tuple[int, int], int]) -> None:
    """(Re)install the gate-layer hooks and the decoder pre-hook for ``columns``' numbering."""
    if state.gates is not None:
        for handle in state.gates.hooks:
            handle.remove()
        state.gates = None
    if not columns:
        return
    by_layer: dict[int, list[tuple[int, Gate]]] = {}
    for (position, g), col in sorted(columns.items(), key=lambda item: item[1]):
        gate = state.patches[position].gates[g]
        by_layer.setdefault(gate.layer, []).append((col, gate))
    device = state.arch.w_out[0].weight.device
    device = device if device.type != "meta" else torch.device("cpu")
    banks = {
        layer: (GateBank([g for _, g in entries], device), slice(entries[0][0], entries[-1][0] + 1))
        for layer, entries in by_layer.items()
    }
    gates = _GateState(banks, len(columns))
    for layer in banks:
        levels = _levels(state, columns, layer, device)
        if levels:
            gates.levels[layer] = levels
    decoder = state.arch.decoder
    if decoder is not None:
        gates.hooks.append(
            decoder.register_forward_pre_hook(_sequence_start(gates), with_kwargs=True)
        )
    for layer in banks:
        block = state.arch.decoder_layers[layer]
        gates.hooks.append(block.register_forward_hook(_gate_hook(gates, layer, min(banks))))
    state.gates = gates


def _levels(
    state: _State, columns: dict[tuple[int, int], int], layer: int, device: torch.device
) -> list[_Level]:
    """The dependent gates of ``layer`` grouped into levels: a gate's level is one above the
    highest level among the same-layer gates it names (0 if it names only lower layers)."""
    level: dict[int, int] = {}
    rows: dict[int, list[tuple[int, list[int], int | None]]] = {}
    for (position, g), col in sorted(columns.items(), key=lambda item: item[1]):
        gate = state.patches[position].gates[g]
        if gate.layer != layer or (gate.requires is None and not gate.any_of):
            continue
        named = [*gate.any_of, *([gate.requires] if gate.requires is not None else [])]
        same = [
            columns[(position, n)] for n in named if state.patches[position].gates[n].layer == layer
        ]
        level[col] = 1 + max((level.get(c, -1) for c in same), default=-1)
        alternatives = [columns[(position, a)] for a in gate.any_of]
        required = None if gate.requires is None else columns[(position, gate.requires)]
        rows.setdefault(level[col], []).append((col, alternatives, required))
    out = []
    for depth in sorted(rows):
        either = [(c, alts) for c, alts, _ in rows[depth] if alts]
        both = [(c, r) for c, _, r in rows[depth] if r is not None]
        width = max((len(alts) for _, alts in either), default=0)
        out.append(
            _Level(
                (
                    torch.tensor([c for c, _ in either], device=device),
                    # padded with the gate's own column: OR with itself changes nothing
                    torch.tensor(
                        [alts + [c] * (width - len(alts)) for c, alts in either], device=device
                    ),
                )
                if either
                else None,
                (
                    torch.tensor([c for c, _ in both], device=device),
                    torch.tensor([r for _, r in both], device=device),
                )
                if both
                else None,
            )
        )
    return out


def _sequence_start(gates: _GateState):
    """Decoder pre-hook: note whether this forward starts a new sequence, and its mask."""

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # transformers >= 5.2x calls it ``cache``; older versions ``past_key_values``
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        fresh = cache is None or (
            hasattr(cache, "get_seq_length") and int(cache.get_seq_length()) == 0
        )
        mask = kwargs.get("attention_mask")
        gates.step = {"fresh": fresh, "mask": mask if isinstance(mask, torch.Tensor) else None}

    return pre_hook


def _gate_hook(gates: _GateState, layer: int, lowest: int):
    bank, columns = gates.banks[layer]

    def compute_gates(module: nn.Module, args: tuple, output) -> None:
        h = output[0] if isinstance(output, tuple) else output  # [B, T, hidden]
        batch, length = h.shape[0], h.shape[1]
        if layer == lowest:  # first gate layer of this forward pass: set up its state
            step = gates.step or {"fresh": True, "mask": None}
            gates.step = None
            carried = gates.carried
            if step["fresh"] or carried is None or carried.shape[0] != batch:
                carried = None
            gates.open = torch.zeros(batch, length, gates.count, dtype=torch.bool, device=h.device)
            mask = step["mask"]
            gates.valid = (
                mask[:, -length:].bool().to(h.device)
                if mask is not None and mask.dim() == 2 and mask.shape[0] == batch
                else None
            )  # [B, T]
            gates.before = carried
            gates.carried = torch.full((batch, gates.count), math.inf, device=h.device)
        before = gates.before[:, columns] if gates.before is not None else None
        age = bank.ages(h, gates.valid, before)  # [B, T, G]
        gates.carried[:, columns] = age[:, -1]  # raw: requirements are checked per position
        gates.open[..., columns] = age < bank.spans
        for level in gates.levels.get(layer, ()):  # what they name is settled by now
            if level.either is not None:
                cols, alternatives = level.either
                gates.open[..., cols] |= gates.open[..., alternatives].any(-1)  # [B, T, n]
            if level.both is not None:
                cols, required = level.both
                gates.open[..., cols] &= gates.open[..., required]

    return compute_gates


def _hook(state: _State, layer: int):
    def add_patch(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        q = args[0]  # [..., intermediate]
        if state.per_row:
            return output + _per_row_delta(state, state.rows[layer], q)
        fold = state.folds.get(layer)
        if fold is not None:
            output = (
                output + q[..., fold.neuron_indices] @ fold.deltas
            )  # [..., n] @ [n, hidden] -> [..., hidden]
        gated = state.gated.get(layer)
        if gated is not None:
            open_ = state.gates.open[..., gated.columns]  # [B, T, n_g]
            open_ = open_.reshape(*q.shape[:-1], -1).to(q.dtype)  # OPT flattens [B*T, ...]
            output = output + (q[..., gated.neuron_indices] * open_) @ gated.deltas
        return output

    return add_patch


def _per_row_delta(state: _State, rows: _RowFold, q: torch.Tensor) -> torch.Tensor:
    """What ``applied_per_row``'s rows add to one layer's output: row j on batch row owner[j]."""
    if q.dim() == 2 and state.batch:  # OPT flattens [B*T, intermediate]
        flat = _per_row_delta(state, rows, q.reshape(state.batch, -1, q.shape[-1]))
        return flat.reshape(q.shape[0], -1)  # [B*T, hidden]
    if q.dim() != 3:
        raise PatchStateError(
            f"applied_per_row() needs W_out inputs shaped [batch, seq, intermediate], got "
            f"{tuple(q.shape)}; score edits one at a time with applied() instead"
        )
    batch = torch.arange(q.shape[0], device=q.device)
    mask = (batch[:, None] == rows.owners)[:, None, :]  # [B, 1, n]
    if state.gates is not None and bool((rows.columns >= 0).any()):
        open_ = state.gates.open  # [B, T, count]
        always = torch.ones_like(open_[..., :1])  # [B, T, 1]: the column of ungated rows
        cols = torch.where(rows.columns < 0, state.gates.count, rows.columns)  # [n]
        mask = mask & torch.cat([open_, always], dim=-1)[..., cols]  # [B, T, n]
    return (q[..., rows.neuron_indices] * mask.to(q.dtype)) @ rows.deltas  # [B, T, hidden]
