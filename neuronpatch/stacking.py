"""Combining patches: stack several edits into one, take them apart again, compare two.

``stack`` makes one patch that does what applying every input patch together does: per layer,
the rows of all inputs, with rows of the same (neuron, gate) summed into one row (the runtime
sums them the same way when the inputs are applied side by side). Gates are concatenated,
identical gates (``Gate.equals``) of different inputs kept once, and ``gate_ids`` remapped;
rows under different gates stay separate rows even for the same neuron. A stacked input is
taken apart first, so ``stack([stack([a, b]), c])`` holds the three edits ``a, b, c``.

Provenance, and why ``unstack`` is exact
-----------------------------------------
The file format allows no tensors beyond the patch's own, so everything ``unstack`` needs
lives in the free-form ``extra`` metadata, as ``extra["stack"]``: a list with one entry per
input edit, in order::

    {"requests", "method", "hparams", "metrics", "extra", "created", "library_version",
     "fingerprint": null | "stack" | {"shape": [L, S], "f32": BASE64},
     "gates": [stacked gate index of the input's gate 0, 1, ...],
     "layers": {"<layer>": {"dtype": "F32", "rows": [stacked row of input row 0, 1, ...],
                            "exact": {"<input row>": BASE64}}}}

- A row touched by one input only is that input's row, cast to the layer's stacked dtype
  (the promotion of the inputs' dtypes, so the cast only widens and casting back is exact).
- A row summed from several inputs cannot be split again by arithmetic (float addition loses
  bits), so each contributing input's own row is kept verbatim in ``exact``: the raw
  little-endian bytes of the row in the input's dtype, base64-encoded. Shared neurons are
  few, so this costs a few KB where the file would otherwise be all deltas.
- The input's fingerprint is ``null`` (it had none), ``"stack"`` (bitwise the stacked
  patch's, the usual case) or its own float32 bytes (same weights, e.g. measured in bf16).

So ``unstack`` rebuilds every input byte for byte: indices, deltas, gates, gate ids,
fingerprint and every metadata field (``created`` included). The stacked patch itself has
``method="stack"``, the concatenated requests, ``hparams={}`` and ``metrics`` with the
number of edits and the shared (summed) neurons.

``diff`` compares two patches: edits (matched by prompt, subject and target_new), neurons
both touch, per-layer delta norms and the cosine similarity of shared neurons' rows.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

import torch

from . import fingerprint
from .errors import InvalidPatchError, StackError

if TYPE_CHECKING:
    from .patch import Gate, LayerDelta, Patch

STACK_KEY = "stack"  # extra[STACK_KEY]: the provenance list
STACK_METHOD = "stack"
_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


# --- stack -------------------------------------------------------------------------------


def is_stacked(patch: Patch) -> bool:
    """Whether ``patch`` carries stack provenance (was written by ``stack``)."""
    return isinstance(patch.extra.get(STACK_KEY), list)


def flatten(patches: Sequence[Patch]) -> list[Patch]:
    """The single edits of ``patches``: stacked patches taken apart, others as they are.

    The parts of a stacked patch are labelled ``FILE#i`` in error messages.
    """
    from .patch import Patch

    parts: list[Patch] = []
    for patch in patches:
        if not isinstance(patch, Patch):
            raise TypeError(f"stack expects Patch objects, got {type(patch).__name__}")
        parts.extend(_unstack(patch, labelled=True) if is_stacked(patch) else [patch])
    return parts


def stack(patches: Sequence[Patch]) -> Patch:
    """One patch holding every edit; per-edit provenance kept so ``unstack`` can undo it.

    Raises StackError when the patches were made for different base models, or when one edit
    is given twice (its deltas would count double).
    """
    from .patch import Patch

    parts = flatten(list(patches))
    if not parts:
        raise StackError("nothing to stack: give at least one patch")
    _check_same_base(parts)
    _check_distinct(parts)
    reference_fp = next((p.base_fingerprint for p in parts if p.base_fingerprint is not None), None)
    gates, gate_maps = _merge_gates(parts)

    layers: dict[int, LayerDelta] = {}
    entries: list[dict[str, Any]] = [
        _entry(p, reference_fp, m) for p, m in zip(parts, gate_maps, strict=True)
    ]
    shared: list[dict[str, Any]] = []
    for layer in sorted({layer for p in parts for layer in p.layers}):
        layers[layer], layer_shared = _stack_layer(layer, parts, gate_maps, entries, bool(gates))
        shared += layer_shared
    rows = sum(len(ld.neuron_indices) for ld in layers.values())
    for layer, ld in layers.items():
        if not torch.isfinite(ld.deltas).all():
            raise StackError(
                f"summing the {ld.deltas.dtype} deltas of neurons shared by several edits "
                f"overflows in layer {layer}; convert the patches to float32 and stack again"
            )
    return Patch(
        layers=layers,
        base=parts[0].base,
        base_fingerprint=reference_fp,
        gates=tuple(gates),
        requests=tuple(r for p in parts for r in p.requests),
        method=STACK_METHOD,
        hparams={},
        metrics={"edits": len(parts), "neurons": rows, "shared_neurons": shared},
        extra={STACK_KEY: entries},
    )


def _stack_layer(
    layer: int,
    parts: list[Patch],
    gate_maps: list[list[int]],
    entries: list[dict[str, Any]],
    gated: bool,
) -> tuple[LayerDelta, list[dict[str, Any]]]:
    """One layer of the stack; fills each entry's ``layers[layer]``; returns the summed rows."""
    from .patch import LayerDelta

    present = [(i, p.layers[layer]) for i, p in enumerate(parts) if layer in p.layers]
    dtype = present[0][1].deltas.dtype
    for _, ld in present[1:]:
        dtype = torch.promote_types(dtype, ld.deltas.dtype)
    accumulate = torch.promote_types(dtype, torch.float32)

    # (neuron, stacked gate) of every input row, in input order
    keys_per_part: list[list[tuple[int, int]]] = []
    for i, ld in present:
        local = ld.gate_ids.tolist() if ld.gate_ids is not None else [-1] * len(ld.neuron_indices)
        gmap = gate_maps[i]
        keys_per_part.append(
            [
                (n, gmap[g] if g >= 0 else -1)
                for n, g in zip(ld.neuron_indices.tolist(), local, strict=True)
            ]
        )
    keys = sorted({key for part_keys in keys_per_part for key in part_keys})
    row_of = {key: r for r, key in enumerate(keys)}
    contributors: dict[int, list[int]] = {}
    for (i, _), part_keys in zip(present, keys_per_part, strict=True):
        for key in part_keys:
            contributors.setdefault(row_of[key], []).append(i)

    hidden = parts[0].base.hidden_size
    # -0.0 is the additive identity bit for bit (0.0 + -0.0 would give +0.0), so a row with
    # one contributor is exactly that contributor's row
    summed = torch.full((len(keys), hidden), -0.0, dtype=accumulate)  # [n, hidden]
    for (i, ld), part_keys in zip(present, keys_per_part, strict=True):
        if part_keys:
            rows = torch.tensor([row_of[key] for key in part_keys], dtype=torch.int64)
            summed.index_add_(0, rows, ld.deltas.to(accumulate))
        entry_rows = [row_of[key] for key in part_keys]
        exact = {
            str(j): _encode(ld.deltas[j])
            for j, r in enumerate(entry_rows)
            if len(contributors[r]) > 1
        }
        spec: dict[str, Any] = {"dtype": _DTYPE_NAMES[ld.deltas.dtype], "rows": entry_rows}
        if exact:
            spec["exact"] = exact
        entries[i]["layers"][str(layer)] = spec

    neurons = torch.tensor([n for n, _ in keys], dtype=torch.int64)
    gate_ids = torch.tensor([g for _, g in keys], dtype=torch.int64) if gated else None
    shared = [
        {"layer": layer, "neuron": keys[r][0], "gate": keys[r][1], "edits": who}
        for r, who in sorted(contributors.items())
        if len(who) > 1
    ]
    return LayerDelta(neurons, summed.to(dtype), gate_ids), shared


def _entry(patch: Patch, reference_fp: torch.Tensor | None, gate_map: list[int]) -> dict:
    """The provenance of one input, without its layers (filled in per layer)."""
    fp = patch.base_fingerprint
    if fp is None:
        fp_spec: Any = None
    elif (
        reference_fp is not None and fp.shape == reference_fp.shape and _same_bits(fp, reference_fp)
    ):
        fp_spec = "stack"
    else:
        fp_spec = {"shape": list(fp.shape), "f32": _encode(fp)}
    return {
        # a JSON round trip: a copy, in the form the file will hold (tuples become lists)
        "requests": _json_copy(list(patch.requests)),
        "method": patch.method,
        "hparams": _json_copy(dict(patch.hparams)),
        "metrics": _json_copy(dict(patch.metrics)),
        "extra": _json_copy(dict(patch.extra)),
        "created": patch.created,
        "library_version": patch.library_version,
        "fingerprint": fp_spec,
        "gates": list(gate_map),
        "layers": {},
    }


def _local_gate(gate: Gate, local: dict[int, int]) -> Gate:
    """A stacked gate as its input held it: ``requires`` and ``any_of`` back to the input's
    numbering."""
    if gate.requires is not None:
        gate = replace(gate, requires=local[gate.requires])
    return replace(gate, any_of=tuple(local[a] for a in gate.any_of)) if gate.any_of else gate


def _merge_gates(parts: list[Patch]) -> tuple[list[Gate], list[list[int]]]:
    """All gates once each, and per input the stacked index of each of its gates.

    An input's own gates always map to distinct stacked gates (even two identical ones), so
    its gate ids can be told apart again. A gate's ``requires`` and ``any_of`` (earlier gates of
    the same input) are renumbered to the stacked indices of those gates.
    """
    gates: list[Gate] = []
    by_bytes: dict[tuple, list[int]] = {}
    maps: list[list[int]] = []
    for part in parts:
        mapping: list[int] = []
        for gate in part.gates:
            if gate.requires is not None:
                gate = replace(gate, requires=mapping[gate.requires])
            if gate.any_of:
                gate = replace(gate, any_of=tuple(mapping[a] for a in gate.any_of))
            key = (
                gate.kind,
                gate.layer,
                gate.threshold,
                gate.key.numpy().tobytes(),
                gate.centre.numpy().tobytes(),
                gate.requires,
                gate.span,
                gate.any_of,
            )
            candidates = by_bytes.setdefault(key, [])
            hit = next((g for g in candidates if g not in mapping and gates[g].equals(gate)), None)
            if hit is None:
                gates.append(gate)
                hit = len(gates) - 1
                candidates.append(hit)
            mapping.append(hit)
        maps.append(mapping)
    return gates, maps


def _check_same_base(parts: list[Patch]) -> None:
    first = parts[0]
    for other in parts[1:]:
        problem = base_difference(first, other)
        if problem is not None:
            raise StackError(
                f"cannot stack {first.label} and {other.label}: {problem}. "
                "Stack only patches made for the same base model."
            )


def base_difference(a: Patch, b: Patch) -> str | None:
    """What tells the base models of ``a`` and ``b`` apart, or None when they are the same."""
    if a.base != b.base:
        differ = [
            f"{f.name} {getattr(a.base, f.name)!r} vs {getattr(b.base, f.name)!r}"
            for f in fields(a.base)
            if getattr(a.base, f.name) != getattr(b.base, f.name)
        ]
        return "they were made for different base models (" + "; ".join(differ) + ")"
    if a.base_fingerprint is not None and b.base_fingerprint is not None:
        dist = fingerprint.distance(b.base_fingerprint, a.base_fingerprint)
        if not dist < fingerprint.TOLERANCE:
            return (
                f"same architecture, but their base fingerprints differ (relative distance "
                f"{dist:.3g}, tolerance {fingerprint.TOLERANCE}): they were made for "
                "different weights"
            )
    return None


def _check_distinct(parts: list[Patch]) -> None:
    seen: dict[str, Patch] = {}
    for part in parts:
        if part.num_neurons == 0:  # empty edits of different requests share an id
            continue
        if part.patch_id in seen:
            raise StackError(
                f"{part.label} and {seen[part.patch_id].label} hold the same edit (patch id "
                f"{part.patch_id}); stacking both would add its deltas twice. Drop one of them."
            )
        seen[part.patch_id] = part


# --- unstack -----------------------------------------------------------------------------


def unstack(patch: Patch) -> list[Patch]:
    """The single-edit patches a stacked patch was made from, byte-identical to the originals.

    Raises StackError for a patch without stack provenance or with malformed provenance.
    """
    return _unstack(patch, labelled=False)


def _unstack(patch: Patch, labelled: bool) -> list[Patch]:
    entries = patch.extra.get(STACK_KEY)
    if not isinstance(entries, list):
        raise StackError(
            f"{patch.label} is not a stacked patch: its metadata has no stack provenance "
            f"(extra[{STACK_KEY!r}]), so there is nothing to take apart. Only patches written "
            "by `neuronpatch stack` / Patch.stack can be unstacked."
        )
    try:
        _check_shared_rows(patch, entries)
        return [
            _rebuild(patch, entry, f"{patch.label}#{i}" if labelled else None)
            for i, entry in enumerate(entries)
        ]
    except InvalidPatchError as exc:
        raise StackError(
            f"{patch.label}: its stack provenance does not rebuild a valid patch ({exc})"
        ) from exc
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
        raise StackError(
            f"{patch.label}: its stack provenance (extra[{STACK_KEY!r}]) is malformed "
            f"({type(exc).__name__}: {exc}); it cannot be unstacked. Was the metadata edited?"
        ) from exc


def _check_shared_rows(patch: Patch, entries: list[Any]) -> None:
    """Every stacked row used by several entries must be stored exactly by each of them."""
    users: dict[tuple[int, int], int] = {}
    for entry in entries:
        for layer, spec in entry["layers"].items():
            for r in spec["rows"]:
                users[(int(layer), int(r))] = users.get((int(layer), int(r)), 0) + 1
    for i, entry in enumerate(entries):
        for layer, spec in entry["layers"].items():
            exact = spec.get("exact", {})
            for j, r in enumerate(spec["rows"]):
                if users[(int(layer), int(r))] > 1 and str(j) not in exact:
                    raise ValueError(
                        f"edit {i} shares layer {layer} row {r} with another edit but does not "
                        "store its own part of it"
                    )


def _rebuild(stacked: Patch, entry: dict[str, Any], source: str | None) -> Patch:
    from .patch import LayerDelta, Patch

    gate_map = [int(g) for g in entry["gates"]]
    local_gate = {g: j for j, g in enumerate(gate_map)}
    layers = {}
    for key, spec in entry["layers"].items():
        layer = int(key)
        ld = stacked.layers[layer]
        dtype = _DTYPES[spec["dtype"]]
        rows = torch.tensor([int(r) for r in spec["rows"]], dtype=torch.int64)  # [k]
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(ld.neuron_indices)):
            raise IndexError(f"layer {layer} row out of range 0..{len(ld.neuron_indices) - 1}")
        deltas = ld.deltas[rows].to(dtype)  # [k, hidden]
        for j, data in spec.get("exact", {}).items():
            deltas[int(j)] = _decode(data, dtype, (deltas.shape[1],))
        gate_ids = None
        if gate_map:
            stacked_ids = ld.gate_ids[rows].tolist() if ld.gate_ids is not None else []
            gate_ids = torch.tensor(
                [local_gate[g] if g >= 0 else -1 for g in stacked_ids], dtype=torch.int64
            )
        layers[layer] = LayerDelta(ld.neuron_indices[rows], deltas, gate_ids)
    fp_spec = entry["fingerprint"]
    if fp_spec is None:
        fp = None
    elif fp_spec == "stack":
        fp = stacked.base_fingerprint
        if fp is None:
            raise ValueError("an edit refers to the stack's fingerprint, which is absent")
    else:
        fp = _decode(fp_spec["f32"], torch.float32, tuple(int(s) for s in fp_spec["shape"]))
    for name in ("method", "created", "library_version"):
        if not isinstance(entry[name], str):
            raise TypeError(f"{name} must be a string")
    return Patch(
        layers=layers,
        base=stacked.base,
        base_fingerprint=fp,
        gates=tuple(_local_gate(stacked.gates[g], local_gate) for g in gate_map),
        requests=tuple(entry["requests"]),
        method=entry["method"],
        hparams=dict(entry["hparams"]),
        metrics=dict(entry["metrics"]),
        extra=dict(entry["extra"]),
        created=entry["created"],
        library_version=entry["library_version"],
        source=source,
    )


# --- diff --------------------------------------------------------------------------------


def _edit_key(request: dict[str, Any]) -> tuple:
    return (request.get("prompt"), request.get("subject"), request.get("target_new"))


def _effective_rows(patch: Patch) -> dict[tuple[int, int], torch.Tensor]:
    """(layer, neuron) -> its delta row, summed over gates (what it adds with every gate open)."""
    rows: dict[tuple[int, int], torch.Tensor] = {}
    for layer, ld in patch.layers.items():
        for j, neuron in enumerate(ld.neuron_indices.tolist()):
            row = ld.deltas[j].double()
            key = (layer, neuron)
            rows[key] = rows[key] + row if key in rows else row
    return rows


def diff(a: Patch, b: Patch) -> dict[str, Any]:
    """Edits only in a, only in b, in both; shared neurons; per-layer norms and cosines.

    Edits are matched by (prompt, subject, target_new). A neuron's row is its delta summed
    over gates. Cosines are None where a row is all zeros. JSON-ready.
    """
    keys_b = {_edit_key(r) for r in b.requests}
    keys_a = {_edit_key(r) for r in a.requests}
    rows_a, rows_b = _effective_rows(a), _effective_rows(b)
    shared = sorted(set(rows_a) & set(rows_b))
    neurons = []
    for layer, neuron in shared:
        ra, rb = rows_a[(layer, neuron)], rows_b[(layer, neuron)]
        na, nb = float(ra.norm()), float(rb.norm())
        cos = float(ra @ rb) / (na * nb) if na > 0 and nb > 0 else None
        neurons.append(
            {"layer": layer, "neuron": neuron, "norm_a": na, "norm_b": nb, "cosine": cos}
        )
    layers = []
    for layer in sorted(set(a.layers) | set(b.layers)):
        la, lb = a.layers.get(layer), b.layers.get(layer)
        layers.append(
            {
                "layer": layer,
                "neurons_a": len(la.neuron_indices) if la is not None else 0,
                "neurons_b": len(lb.neuron_indices) if lb is not None else 0,
                "shared": sum(1 for n in neurons if n["layer"] == layer),
                "norm_a": float(la.deltas.double().norm()) if la is not None else 0.0,
                "norm_b": float(lb.deltas.double().norm()) if lb is not None else 0.0,
            }
        )
    problem = base_difference(a, b)
    return {
        "a": _summary(a),
        "b": _summary(b),
        "same_base": problem is None,
        "base_difference": problem,
        "edits": {
            "only_a": [dict(r) for r in a.requests if _edit_key(r) not in keys_b],
            "only_b": [dict(r) for r in b.requests if _edit_key(r) not in keys_a],
            "both": [dict(r) for r in a.requests if _edit_key(r) in keys_b],
        },
        "layers": layers,
        "shared_neurons": neurons,
    }


def _summary(patch: Patch) -> dict[str, Any]:
    return {
        "label": patch.label,
        "patch_id": patch.patch_id,
        "base": patch.base.describe(),
        "method": patch.method,
        "edits": len(patch.requests),
        "neurons": patch.num_neurons,
        "params": patch.num_params,
        "gates": len(patch.gates),
    }


# --- helpers -----------------------------------------------------------------------------


def _encode(tensor: torch.Tensor) -> str:
    """Raw little-endian bytes of ``tensor`` (any float dtype), base64."""
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return base64.b64encode(raw).decode("ascii")


def _decode(data: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = base64.b64decode(data.encode("ascii"), validate=True)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if flat.numel() == 0:
        return torch.empty(shape, dtype=dtype)
    return flat.view(dtype).reshape(shape).clone()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and _encode(a) == _encode(b)


def _json_copy(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, ensure_ascii=False))


def _describe_row(neuron: dict[str, Any]) -> str:
    gate = "" if neuron["gate"] < 0 else f" (gate {neuron['gate']})"
    return f"layer {neuron['layer']} neuron {neuron['neuron']}{gate}"


# --- command line ------------------------------------------------------------------------


def _cmd_stack(args: argparse.Namespace) -> int:
    from .patch import Patch

    inputs = [Patch.load(path) for path in args.patches]
    parts = flatten(inputs)
    for patch in inputs:
        if is_stacked(patch):
            print(f"{patch.label} is a stack of {len(patch.extra[STACK_KEY])} edits: taken apart")
    if args.calibrate:
        from .calibration import calibrate_verbosely
        from .cli import _load

        if not parts:
            raise StackError("nothing to stack: give at least one patch")
        model, tokenizer = _load(args.model or parts[0].base.name_or_path, args.device)
        parts = calibrate_verbosely(model, tokenizer, parts)
    elif args.model or args.device:
        raise StackError("--model and --device only matter with --calibrate; add --calibrate")
    elif any(g.kind == "subject" for p in parts for g in p.gates):
        print(
            "hint: these patches have subject gates, which can open on each other's prompts; "
            "--calibrate raises them to stay shut there (loads the base model)"
        )
    stacked = stack(parts)
    shared = stacked.metrics["shared_neurons"]
    if shared:
        print(f"{len(shared)} neuron(s) touched by several edits, summed into one row each:")
        for neuron in shared:
            who = ", ".join(parts[i].label for i in neuron["edits"])
            print(f"  {_describe_row(neuron)}: {who}")
    else:
        print("no neuron is touched by more than one edit")
    path = stacked.save(args.output)
    print(
        f"stacked {len(parts)} edits into {path}: {stacked.num_neurons} neurons in layers "
        f"{list(stacked.layers)}, {len(stacked.gates)} gates, {path.stat().st_size:,} bytes"
    )
    return 0


def _cmd_unstack(args: argparse.Namespace) -> int:
    from .batch import patch_path
    from .patch import Patch

    stacked = Patch.load(args.patch)
    parts = unstack(stacked)
    for i, part in enumerate(parts):
        request = part.requests[0] if part.requests else {}
        print(part.save(patch_path(args.output, i, request)))
    print(f"unstacked {len(parts)} edits from {stacked.label} into {args.output}", file=sys.stderr)
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from .patch import Patch

    result = diff(Patch.load(args.a), Patch.load(args.b))
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    print(format_diff(result))
    return 0


def format_diff(result: dict[str, Any]) -> str:
    """``diff``'s result as human-readable text with tables."""
    from .cli import _print_table  # imported here: cli imports this module

    lines = []
    for side in ("a", "b"):
        s = result[side]
        lines.append(
            f"{side.upper()}  {s['label']}  (id {s['patch_id']}, {s['method']}, {s['edits']} "
            f"edits, {s['neurons']} neurons, {s['gates']} gates)"
        )
    if result["same_base"]:
        lines.append(f"base: same ({result['a']['base']})")
    else:
        lines.append(f"base: DIFFERENT: {result['base_difference']}")
    for key, title in (("only_a", "only in A"), ("only_b", "only in B"), ("both", "in both")):
        edits = result["edits"][key]
        lines.append(f"edits {title}: {len(edits)}")
        lines += [f"  {r.get('prompt')!r} -> {r.get('target_new')!r}" for r in edits]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        if result["layers"]:
            _print_table(
                [
                    (
                        str(row["layer"]),
                        str(row["neurons_a"]),
                        str(row["neurons_b"]),
                        str(row["shared"]),
                        f"{row['norm_a']:.4f}",
                        f"{row['norm_b']:.4f}",
                    )
                    for row in result["layers"]
                ],
                ("layer", "neurons A", "neurons B", "shared", "|delta A|", "|delta B|"),
            )
        shared = result["shared_neurons"]
        print(f"shared neurons: {len(shared)}")
        if shared:
            _print_table(
                [
                    (
                        str(n["layer"]),
                        str(n["neuron"]),
                        f"{n['norm_a']:.4f}",
                        f"{n['norm_b']:.4f}",
                        "—" if n["cosine"] is None else f"{n['cosine']:+.3f}",
                    )
                    for n in shared
                ],
                ("layer", "neuron", "|delta A|", "|delta B|", "cosine"),
            )
    lines.append(buffer.getvalue().rstrip("\n"))
    return "\n".join(lines)


def add_subparsers(sub: argparse._SubParsersAction) -> None:
    """The ``stack``, ``unstack`` and ``diff`` commands."""
    p = sub.add_parser(
        "stack",
        help="combine patches into one patch holding every edit",
        description=(
            "Write one patch that does what applying all PATCHes together does. They must "
            "share a base model. Neurons touched by several edits (same layer, neuron and "
            "gate) are summed into one row and listed. Each edit's provenance is kept, so "
            "`neuronpatch unstack` gives back the original files byte for byte. A stacked "
            "input is taken apart into its edits first. With --calibrate, each subject gate is "
            "first raised to stay shut on the other edits' prompts (needs the base model)."
        ),
    )
    p.add_argument("patches", nargs="+", metavar="PATCH", help="patch files to stack")
    p.add_argument("-o", "--output", required=True, help="where to write the stacked patch")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="raise each subject gate's threshold so it stays shut on the other edits' prompts "
        "(loads the base model; recommended for stacks of gated edits, see "
        "neuronpatch.calibration)",
    )
    p.add_argument("--model", help="with --calibrate: the base model (default: the patches' base)")
    p.add_argument("--device", help="with --calibrate: where the model runs (default: cpu)")
    p.set_defaults(func=_cmd_stack)

    p = sub.add_parser(
        "unstack",
        help="split a stacked patch back into its single-edit patches",
        description=(
            "Write each edit of a stacked patch as its own file, DIR/{i:05d}-{slug}.safetensors, "
            "byte-identical to the file that was stacked. Existing files of those names are "
            "replaced (atomically)."
        ),
    )
    p.add_argument("patch", help="stacked patch file")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write into")
    p.set_defaults(func=_cmd_unstack)

    p = sub.add_parser(
        "diff",
        help="compare two patches: edits, shared neurons, delta norms",
        description=(
            "Compare patches A and B: edits only in A, only in B and in both (matched by "
            "prompt, subject and target_new); per layer the neurons and delta norms of each; "
            "the neurons both touch, with the cosine similarity of their delta rows."
        ),
    )
    p.add_argument("a", metavar="A", help="first patch file")
    p.add_argument("b", metavar="B", help="second patch file")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=_cmd_diff)
