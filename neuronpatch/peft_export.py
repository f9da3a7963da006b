"""Exporting patches as standard PEFT LoRA adapters (rank k, one-hot A, B = deltas^T).

A patch layer with neurons ``idx`` (int64 [k]) and deltas ``D`` ([k, hidden]) adds
``q[..., idx] @ D`` to W_out's output. A LoRA adapter on W_out adds ``scaling * B @ A @ q``,
so with

    A = onehot(idx)   [k, intermediate]   (row j is e_{idx[j]})
    B = D^T           [hidden, k]
    scaling = lora_alpha / r = 1

the adapter is the patch, exactly: ``A @ q`` only selects coordinates. Each patched layer's
W_out gets its own rank k (PEFT's ``rank_pattern``, with ``alpha_pattern`` equal to it so
every scaling is 1); unpatched layers and every other module are not targeted. GPT-2's
Conv1D stores W_out as [intermediate, hidden]; PEFT handles that with ``fan_in_fan_out=True``
and the same A and B.

Several patches export as one adapter, folded per layer as the runtime folds them (deltas of
a neuron listed by several patches are summed), so the adapter equals applying them all.

A gated patch (rows guarded by a gate that opens per position) has no exact LoRA form: LoRA
adds its update at every position. It is refused (GatedPatchError) unless
``approximate=True``, which exports its deltas ungated and warns.

The adapter's dtype is the deltas' dtype: float32 for patches made by neuronpatch; float16,
bfloat16 or float64 deltas stay in that dtype; patches of mixed dtypes export in the dtype
both promote to (float16 + bfloat16 -> float32). Sums are taken in at least float32.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from . import fingerprint
from .arch import ARCHITECTURES, supported_model_types
from .errors import ExportError, GatedPatchError, UnsupportedModelError
from .runtime import fold_rows

if TYPE_CHECKING:
    from .patch import BaseModelInfo, Patch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# What an existing folder may hold for export to replace it: exactly what export writes.
_ADAPTER_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME})
# PEFT's state-dict prefix for the wrapped model (PeftModel.base_model.model).
_STATE_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraLayer:
    """One targeted W_out module of the adapter."""

    layer: int
    module: str  # full module name inside the causal LM, e.g. "model.layers.3.mlp.down_proj"
    neuron_indices: torch.Tensor  # int64 [r], sorted, unique
    deltas: torch.Tensor  # [r, hidden], summed over the exported patches

    @property
    def rank(self) -> int:
        return len(self.neuron_indices)


@dataclass(frozen=True)
class PeftExport:
    """What ``export`` wrote: the folder, the per-layer ranks, the dtype, the file sizes."""

    directory: Path
    base: BaseModelInfo
    layers: tuple[LoraLayer, ...]
    dtype: torch.dtype
    num_patches: int
    approximate: bool  # True when gates were dropped
    file_bytes: dict[str, int]

    @property
    def ranks(self) -> dict[int, int]:
        """Layer -> LoRA rank (number of distinct neurons patched in that layer)."""
        return {ld.layer: ld.rank for ld in self.layers}


def to_peft(
    patches: Patch | Sequence[Patch],
    directory: str | os.PathLike[str],
    *,
    approximate: bool = False,
) -> Path:
    """Write one LoRA adapter equal to the given patches applied together; returns the folder.

    ``patches``: a Patch, a patch path, or a sequence of them (all for the same base model).
    The folder gets ``adapter_config.json`` and ``adapter_model.safetensors``, loadable with
    ``peft.PeftModel.from_pretrained(base_model, directory)``. It is written atomically: an
    existing adapter folder there is replaced as a whole, a folder holding anything else is
    refused. Gated patches raise GatedPatchError unless ``approximate=True``, which exports
    their deltas ungated (with a warning): a LoRA adapter cannot reproduce a gate.
    """
    return export(patches, directory, approximate=approximate).directory


def export(
    patches: Patch | Sequence[Patch],
    directory: str | os.PathLike[str],
    *,
    approximate: bool = False,
) -> PeftExport:
    """``to_peft``, returning what was written (ranks per layer, dtype, bytes)."""
    loaded = _load_all(patches)
    _check_same_base(loaded)
    _check_gates(loaded, approximate)
    base = loaded[0].base
    layers = _fold(loaded, _module_prefix(base))
    if not layers:
        raise ExportError(
            f"{', '.join(p.label for p in loaded)}: no neuron is patched (every layer has "
            "k = 0), and a LoRA adapter needs at least one target module. Nothing was written."
        )
    dtype = functools.reduce(torch.promote_types, [ld.deltas.dtype for ld in layers])
    target = Path(directory)
    _check_target(target)
    config = _adapter_config(base, layers)
    tensors = _adapter_tensors(layers, base.intermediate_size, dtype)
    metadata = {
        "format": "pt",  # what PEFT and transformers write and expect
        "neuronpatch_patches": json.dumps([p.patch_id for p in loaded]),
        "neuronpatch_approximate": json.dumps(approximate and _any_gated(loaded)),
    }
    file_bytes = _write_atomically(target, config, tensors, metadata)
    return PeftExport(
        directory=target,
        base=base,
        layers=tuple(layers),
        dtype=dtype,
        num_patches=len(loaded),
        approximate=approximate and _any_gated(loaded),
        file_bytes=file_bytes,
    )


# --- checks ----------------------------------------------------------------------------


def _load_all(patches: Any) -> list[Patch]:
    from .patch import Patch
    from .runtime import load_patch

    if isinstance(patches, (Patch, str, os.PathLike)):
        patches = [patches]
    loaded = [load_patch(p) for p in patches]
    if not loaded:
        raise ExportError("no patches to export; pass at least one Patch or patch file")
    seen: dict[str, Patch] = {}
    for patch in loaded:
        if patch.patch_id in seen:
            raise ExportError(
                f"{patch.label} is listed twice (same content as {seen[patch.patch_id].label}); "
                "exporting it twice would double its deltas. List each patch once."
            )
        seen[patch.patch_id] = patch
    return loaded


def _check_same_base(patches: list[Patch]) -> None:
    first = patches[0]
    for patch in patches[1:]:
        if patch.base != first.base:
            raise ExportError(
                f"{patch.label} was made for {patch.base.describe()}, but {first.label} for "
                f"{first.base.describe()}; one adapter has one base model. Export the patches "
                "of each base model separately."
            )
        a, b = first.base_fingerprint, patch.base_fingerprint
        if a is not None and b is not None and not fingerprint.matches(b, a):
            raise ExportError(
                f"{patch.label} and {first.label} name the same base "
                f"{first.base.name_or_path!r} but were made on different weights (base "
                f"fingerprints differ by {fingerprint.distance(b, a):.3g}); one adapter has one "
                "base model. Export them separately."
            )


def _is_gated(patch: Patch) -> bool:
    """Whether a gate guards any of the patch's rows (a patch with gates but no guarded row
    exports exactly). Code without ``Patch.is_gated`` counts any gate."""
    flag = getattr(patch, "is_gated", None)
    if isinstance(flag, bool):
        return flag
    return bool(getattr(patch, "gates", ()))


def _any_gated(patches: list[Patch]) -> bool:
    return any(_is_gated(p) for p in patches)


def _check_gates(patches: list[Patch], approximate: bool) -> None:
    gated = [p.label for p in patches if _is_gated(p)]
    if not gated:
        return
    if not approximate:
        raise GatedPatchError(
            f"{', '.join(gated)} {'is' if len(gated) == 1 else 'are'} gated: a gate decides per "
            "position whether the deltas apply, but a LoRA adapter adds its update at every "
            "position, so it cannot reproduce the gate. Pass approximate=True (CLI: "
            "--approximate) to export the deltas ungated: the edit then fires everywhere and "
            "locality gets worse. For an exact adapter, edit ungated: method='fine' (CLI: "
            "--method fine). Nothing was written."
        )
    warnings.warn(
        f"exporting {', '.join(gated)} without {'its gate' if len(gated) == 1 else 'their gates'}"
        " (approximate=True): the LoRA adapter adds the deltas at every position, so the edit "
        "fires everywhere and locality is worse than with the gated patch.",
        UserWarning,
        stacklevel=3,
    )


def _check_target(target: Path) -> None:
    """Refuse a target that is a file or a folder holding anything but a previous adapter."""
    if target.is_symlink():
        raise ExportError(
            f"{target} is a symbolic link; export replaces the folder it writes as a whole, so "
            "pass the real folder (or a new one) instead"
        )
    if target.exists() and not target.is_dir():
        raise ExportError(
            f"{target} exists and is not a folder; pass a new folder (or an adapter folder "
            "written by export) to export into"
        )
    if not target.exists():
        return
    names = {entry.name for entry in target.iterdir()}
    others = sorted(names - _ADAPTER_FILES)
    if others or (names and CONFIG_NAME not in names):
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ExportError(
            f"{target} already holds files that are not a LoRA adapter written by export "
            f"({shown or ', '.join(sorted(names))}); refusing to replace it. Pick a new folder, "
            "or remove those files."
        )


# --- building the adapter --------------------------------------------------------------


def _module_prefix(base: BaseModelInfo) -> str:
    """The causal LM's name for its backbone ("model", "transformer", ...), from transformers."""
    if base.model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"cannot export a patch for model_type {base.model_type!r}: neuronpatch does not "
            f"know where its W_out is. Supported model types: {', '.join(supported_model_types())}."
        )
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(base.model_type)
    model_class = getattr(transformers, class_name, None) if class_name else None
    if model_class is None:
        raise UnsupportedModelError(
            f"transformers {transformers.__version__} has no causal-LM class for model_type "
            f"{base.model_type!r}, so the adapter's module names are unknown; upgrade transformers."
        )
    return model_class.base_model_prefix


def _fold(patches: list[Patch], prefix: str) -> list[LoraLayer]:
    """Per layer, every patch's neurons with shared ones summed (runtime.fold_rows, as applied).

    Gate ids are ignored: gated patches only get here with ``approximate=True``, and then a
    neuron's rows under different gates are summed like any other shared neuron.
    """
    spec = ARCHITECTURES[patches[0].base.model_type]
    folded = []
    for layer in sorted({layer for p in patches for layer in p.layers}):
        parts = [p.layers[layer] for p in patches if layer in p.layers]
        dtype = functools.reduce(torch.promote_types, [ld.deltas.dtype for ld in parts])
        if sum(ld.neuron_indices.numel() for ld in parts) == 0:
            continue
        work = torch.promote_types(dtype, torch.float32)  # sum in float32 at least
        unique, summed = fold_rows(
            [(ld.neuron_indices, ld.deltas) for ld in parts], work
        )  # [r], [r, hidden]
        module = ".".join(
            part for part in (prefix, spec.layers_path, str(layer), spec.w_out_path) if part
        )
        folded.append(LoraLayer(layer, module, unique, summed.to(dtype)))
    return folded


def _adapter_config(base: BaseModelInfo, layers: list[LoraLayer]) -> dict[str, Any]:
    """adapter_config.json: exact module names, per-module rank, alpha = rank (scaling 1)."""
    # The global r = lora_alpha also gives scaling 1 to a reader that ignores the patterns
    # and takes each rank from the tensors' shapes.
    r = max(ld.rank for ld in layers)
    ranks = {ld.module: ld.rank for ld in layers}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": ranks,
        "alpha_pattern": dict(ranks),
        "target_modules": [ld.module for ld in layers],
        "layers_to_transform": None,
        "layers_pattern": None,
        "fan_in_fan_out": ARCHITECTURES[base.model_type].conv1d,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def _adapter_tensors(
    layers: list[LoraLayer], intermediate: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """PEFT's state-dict keys and tensors: one-hot lora_A, lora_B = deltas^T."""
    tensors = {}
    for ld in layers:
        key = f"{_STATE_PREFIX}{ld.module}"
        lora_a = torch.zeros(ld.rank, intermediate, dtype=dtype)  # [r, intermediate]
        lora_a[torch.arange(ld.rank), ld.neuron_indices] = 1
        tensors[f"{key}.lora_A.weight"] = lora_a
        tensors[f"{key}.lora_B.weight"] = ld.deltas.to(dtype).T.contiguous()  # [hidden, r]
    return tensors


# --- writing ---------------------------------------------------------------------------


def _write_atomically(
    target: Path,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
) -> dict[str, int]:
    """Write into a temp folder beside ``target``, then swap it in; returns file -> bytes.

    A folder cannot be renamed over a non-empty one, so an existing adapter is first moved
    aside and deleted only after the new one is in place (and moved back if that fails):
    ``target`` never holds a half-written adapter.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old: Path | None = None
    try:
        with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        save_file(tensors, tmp / WEIGHTS_NAME, metadata=metadata)
        with open(tmp / WEIGHTS_NAME, "rb") as f:
            os.fsync(f.fileno())
        file_bytes = {name: (tmp / name).stat().st_size for name in (CONFIG_NAME, WEIGHTS_NAME)}
        if target.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent)
            )
            os.replace(target, old / "adapter")
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old / "adapter", target)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return file_bytes


# --- command line ----------------------------------------------------------------------


def _cmd_export_peft(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the CLI prints its own note below
        result = export(args.patches, args.directory, approximate=args.approximate)
    conv = ", Conv1D: fan_in_fan_out" if ARCHITECTURES[result.base.model_type].conv1d else ""
    print(
        f"wrote PEFT LoRA adapter {result.directory}/ for {result.base.name_or_path} "
        f"({result.base.model_type}{conv}): {result.num_patches} patch"
        f"{'es' if result.num_patches != 1 else ''}, {len(result.layers)} layer"
        f"{'s' if len(result.layers) != 1 else ''}, {str(result.dtype).removeprefix('torch.')}"
    )
    width = max(len(ld.module) for ld in result.layers)
    print(f"  {'layer':>5}  {'module':<{width}}  rank")
    for ld in result.layers:
        print(f"  {ld.layer:>5}  {ld.module:<{width}}  {ld.rank:>4}")
    for name, size in result.file_bytes.items():
        print(f"  {name}: {size:,} bytes")
    if result.approximate:
        print(
            "note: gated patches were exported WITHOUT their gates (--approximate): the "
            "adapter applies the edit at every position, so locality is worse."
        )
    print(f"load: PeftModel.from_pretrained(base_model, {str(result.directory)!r})")
    return 0


def add_subparsers(sub: argparse._SubParsersAction) -> None:
    """The ``export-peft`` command."""
    p = sub.add_parser(
        "export-peft",
        help="write patches as one standard PEFT LoRA adapter folder",
        description=(
            "Write one or more patches (same base model) as a PEFT LoRA adapter folder "
            "(adapter_config.json + adapter_model.safetensors) that reproduces them exactly: "
            "per patched layer a rank-k LoRA on W_out with one-hot A and B = deltas^T, "
            "scaling 1. Patches sharing a neuron are summed, as when applied together. Load it "
            "with peft.PeftModel.from_pretrained(base_model, DIR). An existing adapter folder "
            "is replaced atomically; a folder holding other files is refused."
        ),
    )
    p.add_argument("patches", nargs="+", metavar="PATCH", help="patch file(s) to export")
    p.add_argument("directory", metavar="DIR", help="adapter folder to write")
    p.add_argument(
        "--approximate",
        action="store_true",
        help=(
            "export gated patches without their gates (a LoRA adapter adds its update at "
            "every position): the edit fires everywhere and locality gets worse"
        ),
    )
    p.set_defaults(func=_cmd_export_peft)
