"""neuronpatch: edit one fact of a language model as a small, reversible patch."""

from ._version import __version__
from .arch import supported_model_types
from .errors import NeuronpatchError
from .models import load_model
from .patch import BaseModelInfo, LayerDelta, Patch
from .request import EditRequest
from .runtime import applied, applied_patches, apply, is_merged, merge, remove, unmerge

__all__ = [
    "BaseModelInfo",
    "EditRequest",
    "LayerDelta",
    "NeuronpatchError",
    "Patch",
    "__version__",
    "applied",
    "applied_patches",
    "apply",
    "is_merged",
    "load_model",
    "merge",
    "remove",
    "supported_model_types",
    "unmerge",
]
