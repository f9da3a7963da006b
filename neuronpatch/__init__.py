"""neuronpatch: edit one fact of a language model as a small, reversible patch."""

from ._version import __version__
from .arch import supported_model_types
from .calibration import calibrate_stack
from .datasets import EditRecord, load_records
from .editor import edit, locate
from .errors import NeuronpatchError
from .fine import FineHparams, NeuronScore
from .kne import KneHparams
from .local import LocalHparams
from .models import load_model
from .patch import BaseModelInfo, LayerDelta, Patch
from .request import EditRequest
from .runtime import (
    applied,
    applied_patches,
    applied_per_row,
    apply,
    is_merged,
    merge,
    remove,
    unmerge,
)

__all__ = [
    "BaseModelInfo",
    "EditRecord",
    "EditRequest",
    "FineHparams",
    "KneHparams",
    "LayerDelta",
    "LocalHparams",
    "NeuronScore",
    "NeuronpatchError",
    "Patch",
    "__version__",
    "applied",
    "applied_patches",
    "applied_per_row",
    "apply",
    "calibrate_stack",
    "edit",
    "is_merged",
    "load_model",
    "load_records",
    "locate",
    "merge",
    "remove",
    "supported_model_types",
    "unmerge",
]
