"""The user-facing ``edit`` and ``locate`` verbs: pick a method, run it per request."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any

from torch import nn

from . import fine, kne
from .errors import InvalidHparamsError
from .fine import FineHparams, NeuronScore, edit_fine
from .kne import KneHparams, edit_kne
from .local import LocalHparams, edit_local
from .patch import Patch
from .request import EditRequest

RequestLike = EditRequest | Mapping[str, Any]

# method name -> (hyperparameter dataclass, function(model, tokenizer, request, hparams, progress))
METHODS: dict[str, tuple[type, Callable[..., Patch]]] = {
    "fine": (FineHparams, edit_fine),
    "local": (LocalHparams, edit_local),
    "kne": (KneHparams, edit_kne),
}
# what a user gets without naming a method: the gated, locality-preserving edit (README,
# "Edits that stay local"); method="fine" is the paper's method exactly
DEFAULT_METHOD = "local"
DEFAULT_LOCATOR = "fine"  # neuronpatch.locate without a method: FiNE's contribution scores


def _locate_fine(model: nn.Module, tokenizer, request: EditRequest, hp: FineHparams):
    return fine.locate(model, tokenizer, request, hp.k, hp.frozen_layers, hp.layers)


# method name -> function(model, tokenizer, request, hparams) -> [NeuronScore], strongest first
LOCATORS: dict[str, Callable[..., list[NeuronScore]]] = {
    "fine": _locate_fine,
    "kne": kne.locate,
}


def make_hparams(method: str, hparams: Any = None, **overrides: Any) -> Any:
    """The method's hyperparameter dataclass: defaults, then ``hparams``, then ``overrides``."""
    if method not in METHODS:
        raise InvalidHparamsError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[method][0]
    base = hparams if isinstance(hparams, cls) else cls(**(hparams or {}))
    known = {f.name for f in fields(cls)}
    unknown = set(overrides) - known
    if unknown:
        raise InvalidHparamsError(
            f"unknown hyperparameter(s) {sorted(unknown)} for method {method!r}; "
            f"known: {sorted(known)}"
        )
    values = {f.name: getattr(base, f.name) for f in fields(cls)}
    values.update(overrides)
    return cls(**values)


def edit(
    model: nn.Module,
    tokenizer,
    request: RequestLike | Sequence[RequestLike],
    method: str = DEFAULT_METHOD,
    *,
    hparams: Any = None,
    progress: Callable[[int, float], None] | None = None,
    **overrides: Any,
) -> Patch | list[Patch]:
    """Edit one fact (or each of a list, independently) and return the patch(es).

    The model is left bitwise unchanged; apply the result with ``neuronpatch.apply``.
    """
    hp = make_hparams(method, hparams, **overrides)
    run = METHODS[method][1]
    if isinstance(request, (list, tuple)):
        requests = [EditRequest.coerce(r) for r in request]  # validate all before editing any
        return [run(model, tokenizer, r, hp, progress) for r in requests]
    return run(model, tokenizer, EditRequest.coerce(request), hp, progress)


def locate(
    model: nn.Module,
    tokenizer,
    request: RequestLike,
    k: int | None = None,
    frozen_layers: int | None = None,
    layers: Sequence[int] | None = None,
    method: str = DEFAULT_LOCATOR,
    **overrides: Any,
) -> list[NeuronScore]:
    """The neurons ``method`` would edit for ``request``, strongest first.

    ``k`` and ``frozen_layers`` default to the method's own defaults (FiNE: 5 per target
    token, KNE: 20 in all; both freeze the last 3 layers); ``overrides`` are further
    hyperparameters of the method (e.g. KNE's ``selection="threshold"``).
    """
    given = {"k": k, "frozen_layers": frozen_layers, "layers": layers}
    hp = make_hparams(method, **{n: v for n, v in given.items() if v is not None}, **overrides)
    if method not in LOCATORS:
        raise InvalidHparamsError(f"locate supports the methods {sorted(LOCATORS)}, got {method!r}")
    return LOCATORS[method](model, tokenizer, EditRequest.coerce(request), hp)
