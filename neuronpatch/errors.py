"""Every error neuronpatch raises on purpose: one base class, one subclass per failure a user can act on.

Messages say what is wrong, where (file or argument), and how to fix it.
"""

from __future__ import annotations


class NeuronpatchError(Exception):
    """Base class of every error raised on purpose by neuronpatch."""


# --- patch files -----------------------------------------------------------------------


class PatchFileError(NeuronpatchError):
    """A patch file (or bytes) could not be read as a valid neuronpatch patch."""


class PatchNotFoundError(PatchFileError, FileNotFoundError):
    """The patch path does not exist."""


class PickleRefusedError(PatchFileError):
    """The file is a pickle (.bin/.pt/.pth/.pkl); neuronpatch never unpickles."""


class NotSafetensorsError(PatchFileError):
    """The file is not a safetensors file at all."""


class CorruptPatchError(PatchFileError):
    """The file looks like safetensors but is truncated or corrupted."""


class NotAPatchError(PatchFileError):
    """A valid safetensors file that is not a neuronpatch patch (e.g. model weights)."""


class FormatVersionError(PatchFileError):
    """The patch was written by a newer (or unknown) version of the format."""


class InvalidPatchError(NeuronpatchError):
    """The patch's contents are inconsistent (shapes, indices, values)."""


class ShapeMismatchError(InvalidPatchError):
    """Neuron indices and deltas disagree in length, or deltas have the wrong width."""


class IndexOutOfRangeError(InvalidPatchError):
    """A layer or neuron index lies outside the base model."""


class NonFiniteDeltaError(InvalidPatchError):
    """A delta holds NaN or Inf."""


# --- patch vs. model -------------------------------------------------------------------


class IncompatibleModelError(NeuronpatchError):
    """The patch was made for another base model."""


class ArchitectureMismatchError(IncompatibleModelError):
    """The patch's model_type or sizes differ from the model's."""


class FingerprintMismatchError(IncompatibleModelError):
    """Same architecture and sizes, but the model's weights are not the patch's base."""


class UnsupportedModelError(NeuronpatchError):
    """The model's architecture is not in the registry."""


# --- runtime state ---------------------------------------------------------------------


class PatchStateError(NeuronpatchError):
    """The requested operation does not fit what is applied to the model."""


class PatchAlreadyAppliedError(PatchStateError):
    """This patch is already applied to the model."""


class PatchNotAppliedError(PatchStateError):
    """The patch to remove is not applied to the model."""


class MergedStateError(PatchStateError):
    """The model's patches are merged into its weights; unmerge first."""


# --- models and requests ---------------------------------------------------------------


class ModelLoadError(NeuronpatchError):
    """A model named to load_model could not be found or loaded."""


class InvalidRequestError(NeuronpatchError, ValueError):
    """An edit request is malformed (subject not in prompt, empty target, ...)."""


class InvalidHparamsError(NeuronpatchError, ValueError):
    """An editing method was given an unknown or out-of-range hyperparameter."""


# --- gates -----------------------------------------------------------------------------


class GateError(InvalidPatchError):
    """A patch's gate is malformed (non-finite key, threshold out of range, wrong width, ...)."""


class GatedPatchError(NeuronpatchError):
    """The operation cannot be exact for a gated patch (merge into weights, LoRA export)."""


# --- sharing ---------------------------------------------------------------------------


class HubError(NeuronpatchError):
    """A HuggingFace Hub operation on a patch failed."""


class HubNotFoundError(HubError, PatchNotFoundError):
    """The Hub repo, revision or file does not exist (or is not reachable)."""


class AmbiguousHubPatchError(HubError):
    """A Hub repo holds several patches and the address did not say which one."""


class HubIntegrityError(HubError, CorruptPatchError):
    """Downloaded bytes do not match what the Hub says the file is."""


class ExportError(NeuronpatchError):
    """A patch could not be exported to another format (e.g. a PEFT LoRA adapter)."""


class StackError(NeuronpatchError):
    """Patches could not be stacked, unstacked or diffed (different bases, no provenance, ...)."""
