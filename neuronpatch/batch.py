"""Editing many facts: one patch per request, resumable, optionally stacked.

Every request is edited on its own against the unedited model (``neuronpatch.edit`` leaves
the model bitwise unchanged) and saved at once, atomically, as
``DIR/{i:05d}-{slug}.safetensors`` (``i``: the request's position in the list). A rerun into
the same folder skips every request whose file is already there and holds that very request
(made with the same method and hyperparameters), so an interrupted batch resumes where it
stopped; a file holding another request or other hyperparameters stops the batch with
BatchError instead of being overwritten or silently mixed in.

A request that fails does not stop the others. Failures are kept in ``DIR/failures.jsonl``,
one JSON object per failed request (rewritten as the batch goes, so it always describes the
folder's current state):

- ``"status": "error"``: the request was refused (a NeuronpatchError, e.g. a subject that is
  not in the prompt); no patch file.
- ``"status": "unsuccessful"``: the method warned that the edit did not take (the patch's
  ``metrics["success"]`` is false, e.g. FiNE stopped below the target probability); the
  patch is saved, but not counted as a success (nor stacked, unless asked for).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .datasets import FORMATS, EditRecord, load_records
from .editor import (
    DEFAULT_METHOD,
    Outcome,
    check_batch_size,
    chunk_size,
    edit_each,
    hparams_for,
    make_hparams,
)
from .errors import NeuronpatchError, PatchFileError
from .patch import Patch
from .request import EditRequest

DEFAULT_BATCH_SIZE = 8  # the CLI's: measured in benchmarks/results/edit_speed.md

FAILURES_FILE = "failures.jsonl"
REQUEST_FIELDS = frozenset({"prompt", "subject", "target_new", "target_true"})
# fields only benchmark records have: a file with any of them is read by datasets.load_records
_RECORD_FIELDS = frozenset(
    {
        "ground_truth",
        "portability",
        "locality",
        "rephrase_prompt",
        "case_id",
        "locality_prompt",
        "locality_ground_truth",
    }
)
_SLUG_LENGTH = 48


class BatchError(NeuronpatchError):
    """A batch cannot go on: no requests, or its folder holds another batch's patches."""


@dataclass
class BatchItem:
    """What became of one request of a batch."""

    index: int
    request: Any  # as given: a dict, an EditRequest, an EditRecord (its request is edited), ...
    path: Path  # where its patch is, or would be
    status: str = "pending"  # "ok", "unsuccessful" (patch saved, edit did not take), "error"
    resumed: bool = False  # the patch was already in the folder
    message: str | None = None
    warnings: list[str] = field(default_factory=list)

    def failure(self) -> dict[str, Any]:
        """The line ``failures.jsonl`` holds for this request."""
        request = self.request
        if isinstance(request, EditRecord):
            request = request.request
        if isinstance(request, EditRequest):
            request = request.to_dict()
        return {
            "index": self.index,
            "request": request if _jsonable(request) else repr(request),
            "status": self.status,
            "message": self.message,
            "file": self.path.name if self.path.exists() else None,
            "warnings": self.warnings,
        }


@dataclass
class BatchResult:
    """Every request's outcome, in request order."""

    items: list[BatchItem]
    out_dir: Path

    def paths(self, include_unsuccessful: bool = False) -> list[Path]:
        """Patch files of the successful edits (and of the unsuccessful ones, if asked)."""
        wanted = {"ok", "unsuccessful"} if include_unsuccessful else {"ok"}
        return [item.path for item in self.items if item.status in wanted]

    @property
    def failures(self) -> list[BatchItem]:
        return [item for item in self.items if item.status in ("error", "unsuccessful")]

    def summary(self) -> str:
        """One line: how many requests were edited, resumed and failed."""
        edited = sum(1 for i in self.items if i.status != "error" and not i.resumed)
        resumed = sum(1 for i in self.items if i.resumed)
        errors = sum(1 for i in self.items if i.status == "error")
        unsuccessful = sum(1 for i in self.items if i.status == "unsuccessful")
        text = (
            f"batch: {len(self.items)} requests: {edited} edited, {resumed} already done, "
            f"{errors} refused, {unsuccessful} did not reach the target"
        )
        if errors or unsuccessful:
            text += f" (see {self.out_dir / FAILURES_FILE})"
        return text


# --- names and requests ------------------------------------------------------------------


def slug(request: Any) -> str:
    """A short file-name-safe name for a request: its subject and new target, ASCII."""
    if isinstance(request, EditRecord):
        request = request.request
    if isinstance(request, EditRequest):
        request = request.to_dict()
    parts = []
    if isinstance(request, Mapping):
        parts = [str(request.get(k, "")) for k in ("subject", "target_new")]
    text = unicodedata.normalize("NFKD", " ".join(parts)).encode("ascii", "ignore").decode()
    text = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return text[:_SLUG_LENGTH].rstrip("-") or "edit"


def patch_path(out_dir: str | os.PathLike[str], index: int, request: Any) -> Path:
    """Where a batch keeps request ``index``'s patch: ``DIR/{index:05d}-{slug}.safetensors``."""
    return Path(out_dir) / f"{index:05d}-{slug(request)}.safetensors"


def read_requests(
    path: str | os.PathLike[str], fmt: str | None = None, n: int | None = None
) -> list[Any]:
    """The first ``n`` requests of a file (all when None).

    A JSON Lines (or JSON list) file of ``{prompt, subject, target_new, target_true?}``
    objects gives them as they are (each is checked when it is edited, so one bad line fails
    alone); a KnowEdit or CounterFact file (``fmt`` ``"knowedit"``/``"counterfact"``, or told
    from its fields) gives each record's request. ``fmt="requests"`` forces the first reading.
    """
    from .datasets import DatasetError, _read_json_records

    if fmt is not None and fmt not in ("requests", *FORMATS):
        raise BatchError(f"unknown format {fmt!r}; choose requests, {', '.join(FORMATS)}")
    if n is not None and n < 0:
        raise BatchError(f"--n must be >= 0, got {n}")
    local = Path(path)
    if fmt != "requests" and not local.is_file():  # maybe a Hub dataset: datasets knows how
        return [r.request.to_dict() for r in load_records(path, fmt, n)]
    if not local.is_file():
        raise BatchError(f"{path}: no such file")
    raw = _read_json_records(local)
    raw = raw if n is None else raw[:n]
    plain = all(not (isinstance(r, Mapping) and _RECORD_FIELDS & set(r)) for r in raw)
    if fmt == "requests" or (fmt is None and plain):
        return raw
    try:
        return [r.request.to_dict() for r in load_records(local, fmt, n)]
    except DatasetError as exc:
        raise BatchError(f"{exc}") from exc


# --- the batch ---------------------------------------------------------------------------


def edit_batch(
    model,
    tokenizer,
    requests: Sequence[Any],
    out_dir: str | os.PathLike[str],
    method: str = DEFAULT_METHOD,
    hparams: Any = None,
    progress: bool = True,
    *,
    include_unsuccessful: bool = False,
    batch_size: int = 1,
) -> list[Path]:
    """Edit each request on its own, save one patch per request in ``out_dir``; resumable.

    Returns the patch files of the successful edits in request order (with
    ``include_unsuccessful``, also those whose edit did not reach its target). Failures are
    in ``out_dir/failures.jsonl``; see ``run_batch`` for every request's outcome.
    """
    result = run_batch(
        model, tokenizer, requests, out_dir, method, hparams, progress, batch_size=batch_size
    )
    return result.paths(include_unsuccessful)


def run_batch(
    model,
    tokenizer,
    requests: Sequence[Any],
    out_dir: str | os.PathLike[str],
    method: str = DEFAULT_METHOD,
    hparams: Any = None,
    progress: bool = True,
    *,
    batch_size: int = 1,
) -> BatchResult:
    """``edit_batch``, returning every request's outcome.

    ``hparams`` is the method's hyperparameter dataclass or a dict of overrides; bad ones
    raise before anything is edited. ``batch_size`` > 1 optimises that many edits together
    (``neuronpatch.edit``: faster, each patch equal to its edit alone up to rounding).
    """
    hp = (
        make_hparams(method, None, **hparams)
        if isinstance(hparams, Mapping)
        else make_hparams(method, hparams)
    )
    check_batch_size(batch_size, error=BatchError)
    # compared with what finished patches record: "auto" settings resolved for this model
    wanted_hparams = json.loads(json.dumps(asdict(hparams_for(model, hp))))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = _read_failures(out)
    items = [BatchItem(i, r, patch_path(out, i, r)) for i, r in enumerate(requests)]

    todo: list[tuple[BatchItem, EditRequest]] = []
    for item in items:  # first the requests that need no editing, so the ETA is right
        try:
            raw = item.request
            request = EditRequest.coerce(raw.request if isinstance(raw, EditRecord) else raw)
        except NeuronpatchError as exc:
            item.status, item.message = "error", f"{type(exc).__name__}: {exc}"
            continue
        if item.path.exists():
            stored = _load_done(item.path, request, method, wanted_hparams, item.index)
            item.resumed = True
            item.status = "unsuccessful" if stored.metrics.get("success") is False else "ok"
            if item.status == "unsuccessful":
                old = previous.get(item.index, {})
                item.message = old.get("message") or _unsuccessful_message(stored)
                item.warnings = list(old.get("warnings") or [])
        else:
            todo.append((item, request))
    _write_failures(out, items)

    bar = tqdm(
        total=len(items),
        initial=len(items) - len(todo),
        desc="editing",
        unit="edit",
        disable=not progress,
        dynamic_ncols=True,
    )
    chunk = chunk_size(batch_size)
    with bar:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]

            def each(position: int, outcome: Outcome, part=part) -> None:
                item = part[position][0]
                _record(item, outcome)  # on disk as soon as it is done
                if item.status != "ok":
                    _write_failures(out, items)
                    if progress:
                        tqdm.write(f"request {item.index} {item.status}: {item.message}")
                bar.update(1)
                failed = sum(1 for i in items if i.status in ("error", "unsuccessful"))
                if failed:
                    bar.set_postfix_str(f"failed {failed}")

            edit_each(
                model, tokenizer, [r for _, r in part], method, hp, batch_size=batch_size, each=each
            )
    return BatchResult(items, out)


def _record(item: BatchItem, outcome: Outcome) -> None:
    """Save an edit's patch, or note why there is none."""
    item.warnings = outcome.warnings
    if outcome.error is not None:  # this request's fault; the others still edit
        item.status, item.message = "error", f"{type(outcome.error).__name__}: {outcome.error}"
        return
    patch = outcome.patch
    patch.save(item.path)
    if patch.metrics.get("success") is False:
        item.status = "unsuccessful"
        item.message = item.warnings[-1] if item.warnings else _unsuccessful_message(patch)
    else:
        item.status = "ok"


def _unsuccessful_message(patch: Patch) -> str:
    return f"the edit did not reach its target (metrics {json.dumps(dict(patch.metrics))})"


def _load_done(
    path: Path, request: EditRequest, method: str, hparams: dict[str, Any], index: int
) -> Patch:
    """The patch already at ``path``, after checking it is this request's, made this way."""
    where = path.parent
    try:
        stored = Patch.load(path)
    except PatchFileError as exc:
        raise BatchError(
            f"{path} is in the way of request {index} but is not a readable patch ({exc}); "
            "delete it to redo that edit"
        ) from exc
    if stored.requests != (request.to_dict(),):
        raise BatchError(
            f"{path} holds the edit {list(stored.requests)!r}, but request {index} of this "
            f"batch is {request.to_dict()!r}: {where} holds another batch's patches. Use "
            "another output folder (or empty this one) to start afresh."
        )
    conflicts = {
        k: (stored.hparams[k], v)
        for k, v in hparams.items()
        if k in stored.hparams and stored.hparams[k] != v
    }
    if stored.method != method or conflicts:
        detail = (
            f"method {stored.method!r}, this run {method!r}"
            if stored.method != method
            else ", ".join(f"{k}={a!r} (this run {b!r})" for k, (a, b) in conflicts.items())
        )
        raise BatchError(
            f"{path} was made with other settings: {detail}. Rerun with the settings it was "
            f"made with to resume, or use another output folder for these."
        )
    return stored


def _read_failures(out: Path) -> dict[int, dict[str, Any]]:
    path = out / FAILURES_FILE
    if not path.exists():
        return {}
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            found[int(entry["index"])] = entry
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # only used for messages of earlier runs; the patches themselves decide
    return found


def _write_failures(out: Path, items: list[BatchItem]) -> None:
    """Rewrite ``failures.jsonl`` (atomically) from the current outcomes; none: no file."""
    path = out / FAILURES_FILE
    failed = [i for i in items if i.status in ("error", "unsuccessful")]
    if not failed:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as sink:
        for item in failed:
            sink.write(json.dumps(item.failure(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# --- command line ------------------------------------------------------------------------


def _cmd_batch(args: argparse.Namespace) -> int:
    from .calibration import calibrate_verbosely
    from .cli import _load, _parse_hparams  # imported here: cli imports this module
    from .stacking import stack

    requests = read_requests(args.requests, args.format, args.n)
    if not requests:
        raise BatchError(f"{args.requests}: no requests to edit")
    hparams = _parse_hparams(args.hparam)
    make_hparams(args.method, None, **hparams)  # bad hyperparameters fail before loading
    model, tokenizer = _load(args.model, args.device)
    result = run_batch(
        model, tokenizer, requests, args.output, args.method, hparams, batch_size=args.batch_size
    )
    print(result.summary())
    if args.stack:
        paths = result.paths(args.stack_unsuccessful)
        if not paths:
            raise BatchError(f"no successful edit to stack into {args.stack}")
        parts = [Patch.load(p) for p in paths]
        if not args.no_calibrate:
            parts = calibrate_verbosely(model, tokenizer, parts)
        stacked = stack(parts)
        saved = stacked.save(args.stack)
        shared = len(stacked.metrics["shared_neurons"])
        print(
            f"stacked {len(paths)} edits into {saved}: {stacked.num_neurons} neurons "
            f"({shared} shared by several edits, summed), {saved.stat().st_size:,} bytes"
        )
    print(f"patches in {Path(args.output).resolve()}", file=sys.stderr)
    return 1 if result.failures else 0


def add_subparsers(sub: argparse._SubParsersAction) -> None:
    """The ``batch`` command."""
    from .cli import add_edit_arguments  # imported here: cli imports this module

    p = sub.add_parser(
        "batch",
        help="edit many facts, one patch each (resumable), optionally stacked",
        description=(
            "Edit every request of REQUESTS on its own against the unedited model and save "
            "one patch per request as DIR/{i:05d}-{slug}.safetensors. Rerunning into the same "
            "folder skips the requests already done. A request that fails is listed in "
            "DIR/failures.jsonl and the others go on; the exit status is 1 if any failed."
        ),
    )
    p.add_argument(
        "requests",
        metavar="REQUESTS",
        help="JSON Lines file of {prompt, subject, target_new, target_true?} objects, or a "
        "KnowEdit / EasyEdit CounterFact JSON file",
    )
    p.add_argument(
        "--format",
        choices=("requests", *FORMATS),
        help="how to read REQUESTS (default: told from its fields)",
    )
    add_edit_arguments(p)
    p.add_argument("--n", type=int, help="only the first N requests")
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        metavar="B",
        help=f"optimise up to B edits together (default {DEFAULT_BATCH_SIZE}): several times "
        "faster on a CPU, each patch equal to its edit alone up to floating-point rounding; "
        "1 gives exactly the patches of single edits",
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the patches")
    p.add_argument(
        "--stack",
        metavar="S",
        help="also stack the successful edits into the patch file S",
    )
    p.add_argument(
        "--stack-unsuccessful",
        action="store_true",
        help="with --stack, also stack the edits that did not reach their target",
    )
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="with --stack, stack the patches as they are; by default each subject gate is "
        "first raised to stay shut on the other edits' prompts (neuronpatch.calibrate_stack)",
    )
    p.set_defaults(func=_cmd_batch)
