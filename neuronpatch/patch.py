"""The Patch value: per-layer neuron indices and deltas, plus metadata, stored as safetensors.

The file layout is specified in ``patches/FORMAT.md``. Loading never runs code: pickles are
refused outright and every field is validated before a Patch exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ._version import __version__
from .errors import (
    CorruptPatchError,
    FormatVersionError,
    GateError,
    IndexOutOfRangeError,
    NonFiniteDeltaError,
    NotAPatchError,
    NotSafetensorsError,
    PatchNotFoundError,
    PickleRefusedError,
    ShapeMismatchError,
)

FORMAT_NAME = "neuronpatch"
# 5 only where a gate has alternatives (``any_of``) or a same-layer requirement chain deeper
# than one, 4 where a gate requires one of its own layer, 3 where a gate has a span, 2 for
# other gated patches, 1 for ungated ones
FORMAT_VERSION = 5
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3, 4, 5)
_GATED_VERSIONS = ("2", "3", "4", "5")
GATE_KINDS = ("subject", "query")  # same run-time semantics; the key's origin differs

_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_TENSOR_NAME = re.compile(r"^layers\.(0|[1-9][0-9]{0,5})\.(neuron_indices|deltas|gate_ids)$")
_GATE_TENSOR = re.compile(r"^gates\.(0|[1-9][0-9]{0,5})\.(key|centre)$")
_FINGERPRINT = "base_fingerprint"
_DELTA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class BaseModelInfo:
    """Identity of the model a patch was made for."""

    name_or_path: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int

    def describe(self) -> str:
        return (
            f"{self.name_or_path} ({self.model_type}, {self.num_layers} layers, "
            f"hidden {self.hidden_size}, intermediate {self.intermediate_size})"
        )


@dataclass(frozen=True)
class LayerDelta:
    """The edit to one layer's W_out: ``deltas[j]`` is added to neuron ``neuron_indices[j]``'s output direction."""

    neuron_indices: torch.Tensor  # int64 [k]
    deltas: torch.Tensor  # float [k, hidden]
    gate_ids: torch.Tensor | None = None  # int64 [k]: row j's gate in Patch.gates, -1 = ungated


@dataclass(frozen=True, eq=False)
class Gate:
    """Decides per position whether the rows it guards are added (``patches/FORMAT.md``, v2).

    Kinds ``"subject"`` (key: the subject's last token) and ``"query"`` (key: the prompt's
    last token) behave alike: read the residual stream ``h`` output by decoder layer
    ``layer``; a position *matches* when ``cos(h - centre, key) > threshold``; the gate is open
    at every position from the first match of the sequence on (and through later KV-cache
    steps), or with ``span`` = s only at the s positions from each match on (a match at t
    opens t .. t + s - 1: v3). With ``any_of`` = (a, ...) it is also open where any of those
    earlier gates is open (v5), and with ``requires`` = r only where gate r of the same patch is
    open too: open = (own match state OR any_of) AND requires.
    """

    layer: int
    key: torch.Tensor  # float32 [hidden]
    centre: torch.Tensor  # float32 [hidden]
    threshold: float
    kind: str = "subject"
    # index of an earlier gate of the same patch that must be open too (a conjunction)
    requires: int | None = None
    # positions the gate stays open from a match on; None: to the end of the sequence
    span: int | None = None
    # earlier gates of the same patch whose openness also opens this one (a disjunction, v5)
    any_of: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("key", "centre"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise GateError(f"gate {name} must be a tensor, got {type(value).__name__}")
            object.__setattr__(self, name, value.detach().to("cpu", torch.float32).contiguous())
        if isinstance(self.any_of, list):
            object.__setattr__(self, "any_of", tuple(self.any_of))
        if not isinstance(self.any_of, tuple):
            raise GateError(f"gate any_of must be a tuple of gate indices, got {self.any_of!r}")

    def equals(self, other: Gate) -> bool:
        return (
            (self.kind, self.layer, self.threshold, self.requires, self.span, self.any_of)
            == (other.kind, other.layer, other.threshold, other.requires, other.span, other.any_of)
            and torch.equal(self.key, other.key)
            and torch.equal(self.centre, other.centre)
        )


@dataclass(frozen=True, eq=False)
class Patch:
    """A knowledge edit as sparse per-neuron deltas on W_out; see ``patches/FORMAT.md``."""

    layers: Mapping[int, LayerDelta]
    base: BaseModelInfo
    base_fingerprint: torch.Tensor | None = None  # float32 [num_layers, samples]
    gates: tuple[Gate, ...] = ()
    requests: tuple[dict[str, Any], ...] = ()
    method: str = "manual"
    hparams: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _now())
    library_version: str = __version__
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        layers = {}
        for layer, entry in sorted(self.layers.items()):
            if isinstance(entry, tuple):
                entry = LayerDelta(*entry)
            dtype = entry.neuron_indices.dtype
            if dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
                raise ShapeMismatchError(
                    f"{self.source or 'patch'}: layer {layer} neuron_indices must be an "
                    f"integer tensor, got {dtype}"
                )
            gate_ids = entry.gate_ids
            if gate_ids is not None:
                if gate_ids.dtype == torch.bool or gate_ids.dtype.is_floating_point:
                    raise GateError(
                        f"{self.source or 'patch'}: layer {layer} gate_ids must be an integer "
                        f"tensor, got {gate_ids.dtype}"
                    )
                gate_ids = gate_ids.detach().to("cpu", torch.int64).contiguous()
            layers[int(layer)] = LayerDelta(
                entry.neuron_indices.detach().to("cpu", torch.int64).contiguous(),
                entry.deltas.detach().to("cpu").contiguous(),
                gate_ids,
            )
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "requests", tuple(dict(r) for r in self.requests))
        object.__setattr__(self, "gates", tuple(self.gates))
        for layer, ld in layers.items():  # canonical form: gate_ids exactly when gates exist
            if not self.gates:
                layers[layer] = LayerDelta(ld.neuron_indices, ld.deltas)
            elif ld.gate_ids is None:
                layers[layer] = LayerDelta(
                    ld.neuron_indices, ld.deltas, torch.full_like(ld.neuron_indices, -1)
                )
        if self.base_fingerprint is not None:
            fp = self.base_fingerprint.detach().to("cpu", torch.float32).contiguous()
            object.__setattr__(self, "base_fingerprint", fp)
        _validate(self)
        object.__setattr__(self, "_patch_id", _content_hash(self))  # immutable: hash once

    # --- sizes and identity ------------------------------------------------------------

    @property
    def num_neurons(self) -> int:
        """Number of (layer, neuron) pairs the patch touches."""
        return sum(len(ld.neuron_indices) for ld in self.layers.values())

    @property
    def num_params(self) -> int:
        """Number of delta values (neurons x hidden size)."""
        return sum(ld.deltas.numel() for ld in self.layers.values())

    @property
    def is_gated(self) -> bool:
        """Whether any row is guarded by a gate (such a patch cannot be merged or exported exactly)."""
        return any(
            ld.gate_ids is not None and bool((ld.gate_ids >= 0).any())
            for ld in self.layers.values()
        )

    @property
    def patch_id(self) -> str:
        """A short content hash of the edit itself (base identity, indices, deltas)."""
        return self._patch_id

    def __repr__(self) -> str:
        edits = ", ".join(
            f"{r.get('prompt', '?')!r} -> {r.get('target_new', '?')!r}" for r in self.requests[:3]
        )
        if len(self.requests) > 3:
            edits += f", ... ({len(self.requests)} edits)"
        where = f", source={self.source!r}" if self.source else ""
        return (
            f"Patch(method={self.method!r}, base={self.base.name_or_path!r} ({self.base.model_type}), "
            f"edits=[{edits}], layers={list(self.layers)}, neurons={self.num_neurons}, "
            f"params={self.num_params:,}{where})"
        )

    @property
    def label(self) -> str:
        """How messages name this patch: its file, or its id when it lives only in memory."""
        return self.source or f"<patch {self.patch_id}>"

    # --- serialisation -----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The patch as safetensors bytes, identical for identical patches."""
        tensors: dict[str, torch.Tensor] = {}
        for layer, ld in self.layers.items():
            tensors[f"layers.{layer}.neuron_indices"] = ld.neuron_indices
            tensors[f"layers.{layer}.deltas"] = ld.deltas
            if self.gates and ld.gate_ids is not None:
                tensors[f"layers.{layer}.gate_ids"] = ld.gate_ids
        for g, gate in enumerate(self.gates):
            # copies: gates of a stack may share one tensor, which safetensors refuses to save
            tensors[f"gates.{g}.key"] = gate.key.clone()
            tensors[f"gates.{g}.centre"] = gate.centre.clone()
        if self.base_fingerprint is not None:
            tensors[_FINGERPRINT] = self.base_fingerprint
        metadata = {
            "format": FORMAT_NAME,
            # version 1 bytes stay exactly as they were for every ungated patch
            "format_version": _version_of(self.gates),
            "base_model": _dumps(self.base.__dict__),
            "requests": _dumps(list(self.requests)),
            "method": self.method,
            "hparams": _dumps(dict(self.hparams)),
            "metrics": _dumps(dict(self.metrics)),
            "extra": _dumps(dict(self.extra)),
            "created": self.created,
            "library_version": self.library_version,
        }
        if self.gates:
            metadata["gates"] = _dumps([_gate_spec(g) for g in self.gates])
        return _canonical_header(safetensors.torch.save(tensors, metadata=metadata))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the patch atomically (temp file, fsync, rename); returns the path."""
        path = Path(path)
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise PickleRefusedError(
                f"refusing to save a patch as {path}: the {path.suffix} suffix means pickle; "
                "use a .safetensors file name"
            )
        data = self.to_bytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Patch:
        """Read and validate a patch file; raises a PatchFileError subclass naming the problem."""
        path = Path(path)
        if not path.exists():
            raise PatchNotFoundError(f"patch file {path} does not exist; check the path")
        if path.is_dir():
            raise PatchNotFoundError(
                f"{path} is a directory; pass the .safetensors patch file inside it"
            )
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise PickleRefusedError(
                f"{path}: {path.suffix} files are pickles, which can run arbitrary code; "
                "neuronpatch only reads .safetensors patches"
            )
        return cls.from_bytes(path.read_bytes(), source=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> Patch:
        """Parse and validate patch bytes; ``source`` names them in error messages."""
        header = _read_header(data, source)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise NotAPatchError(
                f"{source} is a safetensors file but not a neuronpatch patch "
                "(its metadata has no format='neuronpatch'); is it model weights?"
            )
        version = meta.get("format_version")
        # a list, not a set: a malformed header's version may be unhashable
        if version not in [str(v) for v in SUPPORTED_FORMAT_VERSIONS]:
            raise FormatVersionError(
                f"{source} has patch format version {version!r}; this neuronpatch "
                f"({__version__}) reads versions {list(SUPPORTED_FORMAT_VERSIONS)}. "
                "Upgrade neuronpatch to read it."
            )
        try:
            tensors = safetensors.torch.load(data)
        except BaseException as exc:  # the Rust reader raises PanicException (a BaseException)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise CorruptPatchError(f"{source} is truncated or corrupted: {exc}") from None

        layers: dict[int, dict[str, torch.Tensor]] = {}
        gate_tensors: dict[int, dict[str, torch.Tensor]] = {}
        fingerprint = tensors.pop(_FINGERPRINT, None)
        for name, tensor in tensors.items():
            match = _TENSOR_NAME.match(name)
            gate_match = _GATE_TENSOR.match(name) if version in _GATED_VERSIONS else None
            if gate_match is not None:
                gate_tensors.setdefault(int(gate_match.group(1)), {})[gate_match.group(2)] = tensor
                continue
            if match is None or (match.group(2) == "gate_ids" and version not in _GATED_VERSIONS):
                raise CorruptPatchError(f"{source} holds an unexpected tensor {name!r}")
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        gates = _read_gates(meta, gate_tensors, version, source)
        layer_deltas = {}
        for layer, parts in layers.items():
            if set(parts) - {"gate_ids"} != {"neuron_indices", "deltas"}:
                raise CorruptPatchError(
                    f"{source}: layer {layer} has {sorted(parts)}; needs neuron_indices and deltas"
                )
            layer_deltas[layer] = LayerDelta(
                parts["neuron_indices"], parts["deltas"], parts.get("gate_ids")
            )

        base_fields = _field(meta, "base_model", dict, source)
        try:
            base = BaseModelInfo(
                name_or_path=_typed(base_fields, "name_or_path", str, source),
                model_type=_typed(base_fields, "model_type", str, source),
                num_layers=_positive(base_fields, "num_layers", source),
                hidden_size=_positive(base_fields, "hidden_size", source),
                intermediate_size=_positive(base_fields, "intermediate_size", source),
            )
        except TypeError as exc:
            raise CorruptPatchError(f"{source}: malformed base_model metadata: {exc}") from None
        requests = _field(meta, "requests", list, source)
        if not all(isinstance(r, dict) for r in requests):
            raise CorruptPatchError(f"{source}: metadata 'requests' must be a list of objects")
        for name in ("method", "created", "library_version"):
            if not isinstance(meta.get(name), str):
                raise CorruptPatchError(f"{source}: metadata {name!r} is missing or not a string")
        return cls(
            layers=layer_deltas,
            base=base,
            base_fingerprint=fingerprint,
            gates=gates,
            requests=tuple(requests),
            method=meta["method"],
            hparams=_field(meta, "hparams", dict, source),
            metrics=_field(meta, "metrics", dict, source),
            extra=_field(meta, "extra", dict, source),
            created=meta["created"],
            library_version=meta["library_version"],
            source=source,
        )

    # --- sharing (implemented in hub, peft_export and stacking) ------------------------

    def push_to_hub(
        self,
        repo_id: str,
        filename: str | None = None,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
    ) -> str:
        """Upload the patch to a Hub repo and update its model card; returns the file's URL."""
        from .hub import push_to_hub

        return push_to_hub(
            self,
            repo_id,
            filename,
            private=private,
            token=token,
            commit_message=commit_message,
        )

    @classmethod
    def from_hub(
        cls,
        repo_id: str,
        filename: str | None = None,
        *,
        revision: str | None = None,
        token: str | None = None,
    ) -> Patch:
        """Download a patch from a Hub repo (cached; works offline once cached)."""
        from .hub import from_hub

        return from_hub(repo_id, filename, revision=revision, token=token)

    def to_peft(self, directory: str | os.PathLike[str], *, approximate: bool = False) -> Path:
        """Write the patch as a standard PEFT LoRA adapter folder; returns the folder."""
        from .peft_export import to_peft

        return to_peft(self, directory, approximate=approximate)

    @staticmethod
    def stack(patches: Sequence[Patch]) -> Patch:
        """One patch holding every edit of ``patches``, with per-edit provenance."""
        from .stacking import stack

        return stack(patches)

    def unstack(self) -> list[Patch]:
        """The single-edit patches this stacked patch was made from."""
        from .stacking import unstack

        return unstack(self)


# --- validation ------------------------------------------------------------------------


def _validate(patch: Patch) -> None:
    """Check shapes, dtypes, ranges and values; raise an InvalidPatchError naming the problem."""
    base, where = patch.base, patch.source or "patch"
    for g, gate in enumerate(patch.gates):
        _validate_gate(g, gate, base, where)
        _validate_requires(g, gate, patch.gates, where)
    for layer, ld in patch.layers.items():
        idx, deltas = ld.neuron_indices, ld.deltas
        if not 0 <= layer < base.num_layers:
            raise IndexOutOfRangeError(
                f"{where}: layer {layer} is out of range; the base model "
                f"{base.name_or_path} has layers 0..{base.num_layers - 1}"
            )
        if idx.dim() != 1:
            raise ShapeMismatchError(
                f"{where}: layer {layer} neuron_indices must be 1-D [k], got shape {list(idx.shape)}"
            )
        if deltas.dtype not in _DELTA_DTYPES or deltas.dim() != 2:
            raise ShapeMismatchError(
                f"{where}: layer {layer} deltas must be a float16/bfloat16/float32/float64 "
                f"[k, hidden] tensor, got {deltas.dtype} {list(deltas.shape)}"
            )
        if deltas.shape[0] != idx.shape[0]:
            raise ShapeMismatchError(
                f"{where}: layer {layer} has {idx.shape[0]} neuron indices but "
                f"{deltas.shape[0]} delta rows; they must match"
            )
        if deltas.shape[1] != base.hidden_size:
            raise ShapeMismatchError(
                f"{where}: layer {layer} deltas have width {deltas.shape[1]}, expected hidden "
                f"size {base.hidden_size} of {base.name_or_path}"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= base.intermediate_size):
            bad = idx[(idx < 0) | (idx >= base.intermediate_size)][0].item()
            raise IndexOutOfRangeError(
                f"{where}: layer {layer} neuron index {bad} is out of range "
                f"0..{base.intermediate_size - 1}"
            )
        gate_ids = ld.gate_ids
        if gate_ids is not None:
            _validate_gate_ids(patch, layer, idx, gate_ids, where)
            pairs = idx * (len(patch.gates) + 1) + (gate_ids + 1)  # (neuron, gate) as one int
        else:
            pairs = idx
        if pairs.unique().numel() != pairs.numel():
            raise ShapeMismatchError(
                f"{where}: layer {layer} lists a neuron index twice under the same gate; "
                "sum their deltas into one row"
            )
        if not torch.isfinite(deltas).all():
            raise NonFiniteDeltaError(
                f"{where}: layer {layer} deltas contain NaN or Inf; the patch is unusable"
            )
    fp = patch.base_fingerprint
    if fp is not None and (fp.dim() != 2 or fp.shape[0] != base.num_layers):
        raise ShapeMismatchError(
            f"{where}: base_fingerprint has shape {list(fp.shape)}, expected "
            f"[{base.num_layers}, samples]"
        )
    if fp is not None and not torch.isfinite(fp).all():
        raise NonFiniteDeltaError(f"{where}: base_fingerprint contains NaN or Inf")


def _validate_gate(g: int, gate: Gate, base: BaseModelInfo, where: str) -> None:
    if gate.kind not in GATE_KINDS:
        raise GateError(f"{where}: gate {g} has unknown kind {gate.kind!r}; known: {GATE_KINDS}")
    if isinstance(gate.layer, bool) or not isinstance(gate.layer, int):
        raise GateError(f"{where}: gate {g} layer must be an integer, got {gate.layer!r}")
    if not 0 <= gate.layer < base.num_layers:
        raise GateError(
            f"{where}: gate {g} reads layer {gate.layer}, out of range 0..{base.num_layers - 1}"
        )
    for name in ("key", "centre"):
        value = getattr(gate, name)
        if value.shape != (base.hidden_size,):
            raise GateError(
                f"{where}: gate {g} {name} has shape {list(value.shape)}, expected "
                f"[{base.hidden_size}] (the hidden size of {base.name_or_path})"
            )
        if not torch.isfinite(value).all():
            raise GateError(f"{where}: gate {g} {name} contains NaN or Inf; the gate is unusable")
    if not float(gate.key.norm()) > 0:
        raise GateError(f"{where}: gate {g} key is all zeros; it can never match")
    threshold = gate.threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise GateError(f"{where}: gate {g} threshold must be a number, got {threshold!r}")
    if not -1.0 < threshold < 1.0:
        raise GateError(
            f"{where}: gate {g} threshold {threshold} is out of range; a cosine threshold "
            "must lie strictly between -1 and 1"
        )
    span = gate.span
    if span is not None and (isinstance(span, bool) or not isinstance(span, int) or span < 1):
        raise GateError(
            f"{where}: gate {g} span must be a whole number of positions >= 1 (or None: open "
            f"to the end of the sequence), got {span!r}"
        )


def _validate_requires(g: int, gate: Gate, gates: tuple[Gate, ...], where: str) -> None:
    """``requires`` and ``any_of`` name earlier gates of the patch that read no higher layer
    (the runtime settles a layer's gates in index order, so theirs are known first)."""
    named = [("requires", gate.requires)] if gate.requires is not None else []
    if len(set(gate.any_of)) != len(gate.any_of):
        raise GateError(f"{where}: gate {g} any_of names a gate twice: {list(gate.any_of)}")
    named += [("any_of", a) for a in gate.any_of]
    for field_name, r in named:
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < g:
            raise GateError(
                f"{where}: gate {g} {field_name} names gate {r}; it must name an earlier gate of "
                f"the same patch (0..{g - 1})"
            )
        if gates[r].layer > gate.layer:
            raise GateError(
                f"{where}: gate {g} (layer {gate.layer}) {field_name} names gate {r}, which "
                f"reads layer {gates[r].layer}; it must read the same or a lower layer, to be "
                "known first"
            )


def _validate_gate_ids(
    patch: Patch, layer: int, idx: torch.Tensor, gate_ids: torch.Tensor, where: str
) -> None:
    if gate_ids.shape != idx.shape:
        raise GateError(
            f"{where}: layer {layer} has {idx.numel()} neuron indices but gate_ids of shape "
            f"{list(gate_ids.shape)}; they must match"
        )
    if gate_ids.numel() and (int(gate_ids.min()) < -1 or int(gate_ids.max()) >= len(patch.gates)):
        raise GateError(
            f"{where}: layer {layer} refers to a gate outside -1..{len(patch.gates) - 1} "
            f"(the patch has {len(patch.gates)} gates; -1 means ungated)"
        )
    for g in gate_ids.unique().tolist():
        if g >= 0 and patch.gates[g].layer >= layer:
            raise GateError(
                f"{where}: layer {layer} rows are guarded by gate {g}, which reads layer "
                f"{patch.gates[g].layer}; a gate must read a layer below the rows it guards, "
                "because it is computed before them in the forward pass"
            )


def _read_gates(
    meta: dict[str, Any], tensors: dict[int, dict[str, torch.Tensor]], version: str, source: str
) -> tuple[Gate, ...]:
    if version not in _GATED_VERSIONS:
        return ()
    specs = _field(meta, "gates", list, source)
    if sorted(tensors) != list(range(len(specs))):
        raise CorruptPatchError(
            f"{source}: metadata lists {len(specs)} gates but the tensors hold gates "
            f"{sorted(tensors)}"
        )
    gates = []
    for g, spec in enumerate(specs):
        parts = tensors[g]
        if not isinstance(spec, dict) or set(parts) != {"key", "centre"}:
            raise CorruptPatchError(
                f"{source}: gate {g} needs a metadata object and key + centre tensors"
            )
        kind, layer, threshold = spec.get("kind"), spec.get("layer"), spec.get("threshold")
        if not isinstance(kind, str):
            raise CorruptPatchError(f"{source}: gate {g} kind must be a string")
        requires = spec.get("requires")
        if "requires" in spec and (isinstance(requires, bool) or not isinstance(requires, int)):
            raise CorruptPatchError(f"{source}: gate {g} requires must be a gate index")
        any_of = spec.get("any_of", [])
        if "any_of" in spec and version != "5":
            raise CorruptPatchError(
                f"{source}: gate {g} has any_of, which format version {version} does not define "
                "(such gates are written as version 5)"
            )
        if not isinstance(any_of, list) or not all(
            isinstance(a, int) and not isinstance(a, bool) for a in any_of
        ):
            raise CorruptPatchError(f"{source}: gate {g} any_of must be a list of gate indices")
        span = spec.get("span")
        if "span" in spec and version == "2":
            raise CorruptPatchError(
                f"{source}: gate {g} has a span, which format version 2 does not define "
                "(a gate with a span is written as version 3)"
            )
        if "span" in spec and (isinstance(span, bool) or not isinstance(span, int)):
            raise CorruptPatchError(f"{source}: gate {g} span must be an integer")
        gates.append(
            Gate(layer, parts["key"], parts["centre"], threshold, kind, requires, span, any_of)
        )
    if version in ("2", "3"):
        same = _same_layer_requirers(gates)
        if same:
            raise CorruptPatchError(
                f"{source}: gate {same[0]} requires a gate of its own layer, which format "
                f"version {version} does not define (such gates are written as version 4)"
            )
    if version == "4":
        deep = _deep_same_layer(gates)
        if deep:
            raise CorruptPatchError(
                f"{source}: gate {deep[0]} requires a gate of its own layer that requires a "
                "gate itself, which format version 4 does not define (written as version 5)"
            )
    return tuple(gates)


# --- helpers ---------------------------------------------------------------------------


def _gate_spec(gate: Gate) -> dict[str, Any]:
    spec = {"kind": gate.kind, "layer": gate.layer, "threshold": gate.threshold}
    if gate.requires is not None:  # absent, not null: gates without it keep their old bytes
        spec["requires"] = gate.requires
    if gate.span is not None:  # likewise: only version-3 gates carry it
        spec["span"] = gate.span
    if gate.any_of:  # likewise: only version-5 gates carry it
        spec["any_of"] = list(gate.any_of)
    return spec


def _same_layer_requirers(gates: Sequence[Gate]) -> list[int]:
    """The gates that require an earlier gate of their own layer (format version 4)."""
    return [
        g
        for g, gate in enumerate(gates)
        if gate.requires is not None
        and 0 <= gate.requires < g
        and gates[gate.requires].layer == gate.layer
    ]


def _deep_same_layer(gates: Sequence[Gate]) -> list[int]:
    """The gates that require a gate of their own layer which itself requires a gate (of any
    layer). Version 4 settled a layer's requirements in one step, so a required gate of the
    same layer had to require none; such chains are version 5 (settled level by level)."""
    return [
        g for g in _same_layer_requirers(gates) if gates[gates[g].requires].requires is not None
    ]


def _version_of(gates: tuple[Gate, ...]) -> str:
    """The oldest format version that holds ``gates`` (older files keep their bytes)."""
    if any(g.any_of for g in gates) or _deep_same_layer(gates):
        return "5"
    if _same_layer_requirers(gates):
        return "4"
    if any(g.span is not None for g in gates):
        return "3"
    return "2" if gates else "1"


def _content_hash(patch: Patch) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(patch.base.__dict__, sort_keys=True).encode())
    for layer, ld in patch.layers.items():
        h.update(f"|{layer}|{ld.deltas.dtype}|".encode())
        h.update(ld.neuron_indices.numpy().tobytes())
        h.update(ld.deltas.view(torch.uint8).numpy().tobytes())
        if patch.gates and ld.gate_ids is not None:
            h.update(b"|gate_ids|" + ld.gate_ids.numpy().tobytes())
    for gate in patch.gates:  # ungated patches hash exactly as before gates existed
        h.update(f"|gate|{gate.kind}|{gate.layer}|{gate.threshold!r}|".encode())
        if gate.requires is not None:
            h.update(f"requires|{gate.requires}|".encode())
        if gate.span is not None:
            h.update(f"span|{gate.span}|".encode())
        if gate.any_of:
            h.update(f"any_of|{list(gate.any_of)}|".encode())
        h.update(gate.key.numpy().tobytes() + gate.centre.numpy().tobytes())
    return h.hexdigest()[:16]


def _now() -> str:
    # SOURCE_DATE_EPOCH is the reproducible-builds convention for pinning timestamps.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = (
        datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    )
    return moment.replace(microsecond=0).isoformat()


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _canonical_header(raw: bytes) -> bytes:
    """Rewrite the safetensors header with sorted metadata keys, so equal patches give equal bytes.

    The safetensors writer emits ``__metadata__`` in hash-map order, which varies between
    processes. Tensor offsets are relative to the data section, so only the header changes.
    """
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    ordered = {"__metadata__": header.pop("__metadata__"), **dict(sorted(header.items()))}
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8-byte alignment
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


def _read_header(data: bytes, source: str) -> dict[str, Any]:
    # Pickle protocol 2-5 or zip (torch.save) magic. A valid length prefix can begin with the
    # same bytes (the golden patch starts with 0x80), so a JSON header after it wins.
    magic = data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if data[8:9] != b"{" and (magic or data[:4] == b"PK\x03\x04"):
        raise PickleRefusedError(
            f"{source} is a pickle/zip (torch.save) file; neuronpatch never unpickles. "
            "Patches are .safetensors files written by Patch.save"
        )
    if not data:
        raise NotSafetensorsError(f"{source} is empty, not a safetensors patch")
    if len(data) <= 8:
        raise CorruptPatchError(f"{source} is truncated: {len(data)} bytes, no header")
    if data[8:9] != b"{":
        raise NotSafetensorsError(
            f"{source} is not a safetensors file (no JSON header after the 8-byte length)"
        )
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise CorruptPatchError(
            f"{source} is truncated or corrupted: header claims {n} bytes, file has "
            f"{len(data) - 8} after the length prefix"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptPatchError(f"{source} has a corrupted JSON header: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptPatchError(f"{source} has a corrupted header (not a JSON object)")
    return header


def _field(meta: dict[str, Any], name: str, kind: type, source: str) -> Any:
    raw = meta.get(name)
    if not isinstance(raw, str):
        raise CorruptPatchError(f"{source}: metadata {name!r} is missing")
    try:
        value = json.loads(raw)
        _dumps(value).encode()  # "\ud800" escapes decode to lone surrogates, which cannot be saved
    except (json.JSONDecodeError, RecursionError, UnicodeEncodeError) as exc:
        raise CorruptPatchError(f"{source}: metadata {name!r} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise CorruptPatchError(f"{source}: metadata {name!r} must be a JSON {kind.__name__}")
    return value


def _typed(fields: dict[str, Any], name: str, kind: type, source: str) -> Any:
    value = fields.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CorruptPatchError(f"{source}: base_model.{name} must be a {kind.__name__}")
    return value


def _positive(fields: dict[str, Any], name: str, source: str) -> int:
    value = _typed(fields, name, int, source)
    if value <= 0:
        raise CorruptPatchError(f"{source}: base_model.{name} must be positive, got {value}")
    return value
