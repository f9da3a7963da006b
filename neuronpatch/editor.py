"""The user-facing ``edit`` and ``locate`` verbs: pick a method, run it per request."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from . import fine, kne
from .arch import resolve
from .errors import InvalidHparamsError, NeuronpatchError
from .fine import (
    EditJob,
    FineHparams,
    NeuronScore,
    Optimised,
    finish_edit,
    optimise_jobs,
    prepare_fine,
    run_job,
    run_jobs,
)
from .kne import KneHparams, prepare_kne
from .local import LocalHparams, prepare_local, shared_centres
from .patch import Patch
from .request import EditRequest

RequestLike = EditRequest | Mapping[str, Any]

# method name -> (hyperparameter dataclass, function(model, tokenizer, request, hparams) -> the
# located edit, which fine.run_job / fine.run_jobs optimise into a Patch)
METHODS: dict[str, tuple[type, Callable[..., EditJob]]] = {
    "fine": (FineHparams, prepare_fine),
    "local": (LocalHparams, prepare_local),
    "kne": (KneHparams, prepare_kne),
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


def hparams_for(model: nn.Module, hp: Any) -> Any:
    """``hp`` as an edit of ``model`` uses it: a method's per-model ``"auto"`` settings
    resolved (``LocalHparams.for_model``); what the patches record in their ``hparams``."""
    return hp.for_model(resolve(model)) if hasattr(hp, "for_model") else hp


def edit(
    model: nn.Module,
    tokenizer,
    request: RequestLike | Sequence[RequestLike],
    method: str = DEFAULT_METHOD,
    *,
    hparams: Any = None,
    progress: Callable[[int, float], None] | None = None,
    batch_size: int = 1,
    **overrides: Any,
) -> Patch | list[Patch]:
    """Edit one fact (or each of a list, independently) and return the patch(es).

    The model is left bitwise unchanged; apply the result with ``neuronpatch.apply``.
    A list is edited ``batch_size`` requests at a time: with more than one, their
    optimisations share each forward and backward pass (several times the throughput on a
    CPU; ``benchmarks/results/edit_speed.md``) and each patch equals its edit alone up to
    floating-point rounding. ``batch_size=1`` gives exactly the patches of single edits.
    ``progress(step, min_target_prob)`` is called after every forward pass (in a batch: the
    lowest probability of the edits still running).
    """
    hp = make_hparams(method, hparams, **overrides)
    check_batch_size(batch_size)
    prepare = METHODS[method][1]
    if isinstance(request, (list, tuple)):
        requests = [EditRequest.coerce(r) for r in request]  # validate all before editing any
        with shared_centres():  # the model does not change between the requests
            jobs = [prepare(model, tokenizer, r, hp) for r in requests]
        return run_jobs(model, jobs, progress, batch_size=batch_size)
    return run_job(model, prepare(model, tokenizer, EditRequest.coerce(request), hp), progress)


CHUNK_BATCHES = 4  # tools editing many requests with batch_size > 1 edit this many batches' worth
# per call: rows freed by early stops refill, and results are written chunk by chunk


def check_batch_size(
    value: Any, name: str = "batch_size", error: type = InvalidHparamsError
) -> None:
    """Refuse anything but a whole number >= 1 (as ``error``, naming ``name``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{name} must be a whole number >= 1, got {value!r}")


def chunk_size(batch_size: int) -> int:
    """How many requests a tool edits per ``edit_each`` call for this ``batch_size``."""
    return 1 if batch_size == 1 else CHUNK_BATCHES * batch_size


@dataclass
class Outcome:
    """One request's edit in ``edit_each``: its patch, or the error that stopped it, with the
    warnings it raised and the seconds it took (its share of a batch's steps)."""

    patch: Patch | None = None
    error: NeuronpatchError | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def edit_each(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    method: str,
    hparams: Any,
    *,
    batch_size: int = 1,
    each: Callable[[int, Outcome], None] | None = None,
) -> list[Outcome]:
    """``edit`` for tools that edit many requests (``batch``, ``eval``): a request whose
    preparation fails gets its error and the others go on, and each keeps its own warnings.
    ``hparams`` is the method's dataclass (``make_hparams``). ``each(i, outcome)`` is called
    as soon as request i's outcome is known (e.g. to save its patch); it must not run the
    model, which may be in the middle of a batch."""
    prepare = METHODS[method][1]
    outcomes = [Outcome() for _ in requests]
    jobs: dict[int, EditJob] = {}
    with shared_centres():
        for i, request in enumerate(requests):
            started = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    jobs[i] = prepare(model, tokenizer, request, hparams)
                except NeuronpatchError as exc:
                    outcomes[i].error = exc
            outcomes[i].warnings += [str(w.message) for w in caught]
            outcomes[i].seconds = time.perf_counter() - started
            if i not in jobs and each is not None:
                each(i, outcomes[i])
    order = list(jobs)

    def finished(position: int, done: Optimised) -> None:
        i = order[position]
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outcomes[i].patch = finish_edit(model, jobs[i], done)
        outcomes[i].warnings += [str(w.message) for w in caught]
        outcomes[i].seconds += done.seconds + time.perf_counter() - started
        if each is not None:
            each(i, outcomes[i])

    optimise_jobs(model, [jobs[i] for i in order], batch_size=batch_size, done=finished)
    return outcomes


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
