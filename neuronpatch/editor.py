"""The user-facing ``edit`` verb: pick a method, run it per request, return patches."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any

from torch import nn

from .errors import InvalidHparamsError
from .fine import FineHparams, edit_fine
from .local import LocalHparams, edit_local
from .patch import Patch
from .request import EditRequest

RequestLike = EditRequest | Mapping[str, Any]

# method name -> (hyperparameter dataclass, function(model, tokenizer, request, hparams, progress))
METHODS: dict[str, tuple[type, Callable[..., Patch]]] = {
    "fine": (FineHparams, edit_fine),
    "local": (LocalHparams, edit_local),
}
DEFAULT_METHOD = "fine"


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
