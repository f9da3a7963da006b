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
    IndexOutOfRangeError,
    NonFiniteDeltaError,
    NotAPatchError,
    NotSafetensorsError,
    PatchNotFoundError,
    PickleRefusedError,
    ShapeMismatchError,
)

FORMAT_NAME = "neuronpatch"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_TENSOR_NAME = re.compile(r"^layers\.(0|[1-9][0-9]{0,5})\.(neuron_indices|deltas)$")
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


@dataclass(frozen=True, eq=False)
class Patch:
    """A knowledge edit as sparse per-neuron deltas on W_out; see ``patches/FORMAT.md``."""

    layers: Mapping[int, LayerDelta]
    base: BaseModelInfo
    base_fingerprint: torch.Tensor | None = None  # float32 [num_layers, samples]
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
            layers[int(layer)] = LayerDelta(
                entry.neuron_indices.detach().to("cpu", torch.int64).contiguous(),
                entry.deltas.detach().to("cpu").contiguous(),
            )
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "requests", tuple(dict(r) for r in self.requests))
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
        if self.base_fingerprint is not None:
            tensors[_FINGERPRINT] = self.base_fingerprint
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "base_model": _dumps(self.base.__dict__),
            "requests": _dumps(list(self.requests)),
            "method": self.method,
            "hparams": _dumps(dict(self.hparams)),
            "metrics": _dumps(dict(self.metrics)),
            "extra": _dumps(dict(self.extra)),
            "created": self.created,
            "library_version": self.library_version,
        }
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
        fingerprint = tensors.pop(_FINGERPRINT, None)
        for name, tensor in tensors.items():
            match = _TENSOR_NAME.match(name)
            if match is None:
                raise CorruptPatchError(f"{source} holds an unexpected tensor {name!r}")
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        layer_deltas = {}
        for layer, parts in layers.items():
            if set(parts) != {"neuron_indices", "deltas"}:
                raise CorruptPatchError(
                    f"{source}: layer {layer} has {sorted(parts)}; needs neuron_indices and deltas"
                )
            layer_deltas[layer] = LayerDelta(parts["neuron_indices"], parts["deltas"])

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
        if idx.unique().numel() != idx.numel():
            raise ShapeMismatchError(
                f"{where}: layer {layer} lists a neuron index twice; sum their deltas into one row"
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


# --- helpers ---------------------------------------------------------------------------


def _content_hash(patch: Patch) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(patch.base.__dict__, sort_keys=True).encode())
    for layer, ld in patch.layers.items():
        h.update(f"|{layer}|{ld.deltas.dtype}|".encode())
        h.update(ld.neuron_indices.numpy().tobytes())
        h.update(ld.deltas.view(torch.uint8).numpy().tobytes())
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
