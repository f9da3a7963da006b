"""Knowledge-editing benchmark records: KnowEdit and EasyEdit's CounterFact, read into one shape.

Two file formats are understood (a JSON list of records, or JSON Lines):

- KnowEdit (ZsRE, WikiData_counterfact, WikiData_recent): ``prompt``, ``subject``,
  ``target_new``, ``ground_truth`` (a string, a list of aliases, or absent), optional
  ``rephrase_prompt``, and ``portability`` / ``locality`` dicts of
  ``{key: [{"prompt", "ground_truth"}]}`` whose answers may be a string, a list of aliases or
  a list of lists of aliases.
- EasyEdit CounterFact: flat records with ``case_id``, ``rephrase_prompt``,
  ``locality_prompt`` and ``locality_ground_truth`` (the neighbourhood prompt).

Wherever a field lists aliases, the first one is used, as KnowEdit's loaders do.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidRequestError, NeuronpatchError
from .request import EditRequest

FORMATS = ("knowedit", "counterfact")

# Portability keys KnowEdit uses, with the names its papers give the scores.
PORTABILITY_KEYS = ("Subject_Aliasing", "Logical_Generalization", "Reasoning")
LOCALITY_KEYS = ("Relation_Specificity", "Forgetfulness", "Neighborhood")

Pair = tuple[str, str]  # (prompt, answer)


class DatasetError(NeuronpatchError, ValueError):
    """A benchmark file could not be read: missing, not JSON, or a malformed record."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """Neither a local file nor a Hub dataset that could be downloaded."""


@dataclass(frozen=True)
class EditRecord:
    """One benchmark case: the edit, and the prompts that test its reach and its side effects."""

    request: EditRequest
    rephrase: list[str] = field(default_factory=list)
    # key -> [(prompt, answer)]: Subject_Aliasing, Logical_Generalization, Reasoning
    portability: dict[str, list[Pair]] = field(default_factory=dict)
    # key -> [(prompt, answer)]: Relation_Specificity, Forgetfulness, Neighborhood
    locality: dict[str, list[Pair]] = field(default_factory=dict)
    record_id: str = ""


def load_records(
    path: str | os.PathLike[str], fmt: str | None = None, n: int | None = None
) -> list[EditRecord]:
    """Read the first ``n`` records (all when None) of a KnowEdit or CounterFact file.

    ``path`` is a local file or, when no such file exists, a Hub dataset
    (``owner/name/path/in/repo.json``, optionally ``hf://datasets/`` before it and
    ``@revision`` after the name). ``fmt`` is ``"knowedit"``, ``"counterfact"`` or None to
    tell from the first record. Raises DatasetError naming the file, record and field.
    """
    if fmt is not None and fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if n is not None and n < 0:
        raise DatasetError(f"n must be >= 0, got {n}")
    local = Path(path)
    source = local if local.is_file() else _download(os.fspath(path))
    raw = _read_json_records(source)
    if n is not None:
        raw = raw[:n]
    if not raw:
        return []
    fmt = fmt or _detect(raw[0], source)
    records = [_parse(item, index, source, fmt) for index, item in enumerate(raw)]
    seen: dict[str, int] = {}
    for index, record in enumerate(records):
        if record.record_id in seen:
            raise DatasetError(
                f"{source}: record {index}: field 'case_id': {record.record_id!r} repeats "
                f"record {seen[record.record_id]}'s; record ids must be unique"
            )
        seen[record.record_id] = index
    return records


# --- reading ---------------------------------------------------------------------------


_HUB_ID = re.compile(
    r"^(?:hf://)?(?:datasets/)?(?P<repo>[\w.-]+/[\w.-]+?)(?:@(?P<rev>[\w.-]+))?(?:/(?P<file>.+))?$"
)


def _download(spec: str) -> Path:
    """A Hub dataset file, downloaded (or found in the cache) by huggingface_hub."""
    match = _HUB_ID.match(spec)
    if match is None or spec.startswith((".", "/", "~")):
        raise DatasetNotFoundError(
            f"{spec}: no such file (and not a Hub dataset id like owner/name/file.json)"
        )
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    repo, revision, filename = match["repo"], match["rev"], match["file"]
    try:
        if filename is None:
            files = HfApi().list_repo_files(repo, repo_type="dataset", revision=revision)
            candidates = [f for f in files if f.endswith((".json", ".jsonl"))]
            if len(candidates) != 1:
                shown = ", ".join(candidates[:20]) or "none"
                raise DatasetError(
                    f"{spec}: the Hub dataset {repo} holds {len(candidates)} JSON files "
                    f"({shown}); name one, e.g. {repo}/{candidates[0] if candidates else 'file.json'}"
                )
            filename = candidates[0]
        return Path(hf_hub_download(repo, filename, repo_type="dataset", revision=revision))
    except (OSError, ValueError, HfHubHTTPError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetNotFoundError(
            f"{spec}: not a local file, and the Hub dataset {repo!r}"
            f"{f' file {filename!r}' if filename else ''} could not be fetched "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r}). "
            "If you are offline, download the file and pass its local path."
        ) from exc


def _read_json_records(source: Path) -> list[Any]:
    """The records of a JSON list or a JSON Lines file."""
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{source}: cannot read: {exc}") from exc
    if source.suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{source}: line {line_no} is not JSON: {exc}") from exc
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{source}: not JSON: {exc}") from exc
    if not isinstance(data, list):
        raise DatasetError(
            f"{source}: expected a JSON list of records, got a {type(data).__name__}"
        )
    return data


def _detect(first: Any, source: Path) -> str:
    if not isinstance(first, Mapping):
        raise DatasetError(f"{source}: record 0: expected an object, got {type(first).__name__}")
    if "locality_prompt" in first or "case_id" in first:
        return "counterfact"
    if "prompt" in first and "target_new" in first:
        return "knowedit"
    raise DatasetError(
        f"{source}: record 0 has fields {sorted(first)}; expected KnowEdit records (prompt, "
        "subject, target_new, portability, locality) or EasyEdit CounterFact records "
        "(case_id, prompt, subject, target_new, rephrase_prompt, locality_prompt)"
    )


# --- parsing ---------------------------------------------------------------------------


def _parse(item: Any, index: int, source: Path, fmt: str) -> EditRecord:
    where = f"{source}: record {index}"
    if not isinstance(item, Mapping):
        raise DatasetError(f"{where}: expected an object, got {type(item).__name__}")
    prompt = _text(item, "prompt", where)
    subject = _text(item, "subject", where)
    target_new = _text(item, "target_new", where)
    target_true = _first_alias(item.get("ground_truth"), f"{where}: field 'ground_truth'")
    try:
        request = EditRequest(prompt, subject, target_new, target_true)
    except InvalidRequestError as exc:
        raise DatasetError(f"{where}: field 'subject': {exc}") from None

    rephrase = _prompts(item.get("rephrase_prompt"), f"{where}: field 'rephrase_prompt'")
    portability = _sections(item.get("portability"), where, "portability")
    locality = _sections(item.get("locality"), where, "locality")
    if fmt == "counterfact" and item.get("locality_prompt") is not None:
        neighbours = _flat_pairs(item, "locality_prompt", "locality_ground_truth", where)
        if neighbours:
            locality["Neighborhood"] = neighbours

    record_id = item.get("case_id", index)
    if not isinstance(record_id, (int, str)) or isinstance(record_id, bool):
        raise DatasetError(f"{where}: field 'case_id' must be an integer or string")
    return EditRecord(request, rephrase, portability, locality, str(record_id))


def _text(item: Mapping[str, Any], name: str, where: str) -> str:
    if name not in item:
        raise DatasetError(f"{where}: field {name!r} is missing")
    value = item[name]
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def _first_alias(value: Any, where: str) -> str | None:
    """A string, the first of a list of aliases, or the first of the first list; None if empty."""
    while isinstance(value, list):
        if not value:
            return None
        value = value[0]
    if value is None:
        return None
    if not isinstance(value, str):
        raise DatasetError(f"{where} must be a string or a list of strings, got {value!r}")
    return value if value.strip() else None


def _prompts(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise DatasetError(f"{where} must be a string or a list of strings, got {bad[0]!r}")
    return [v for v in values if v.strip()]


def _sections(value: Any, where: str, name: str) -> dict[str, list[Pair]]:
    """``{key: [{"prompt", "ground_truth"}]}`` to ``{key: [(prompt, answer)]}``.

    Keys with no usable item are left out, so a record without them does not count for them.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DatasetError(
            f"{where}: field {name!r} must be an object of lists, got {type(value).__name__}"
        )
    sections = {}
    for key, items in value.items():
        if items is None:
            continue
        items = [items] if isinstance(items, Mapping) else items
        if not isinstance(items, list):
            raise DatasetError(
                f"{where}: field '{name}.{key}' must be a list, got {type(items).__name__}"
            )
        pairs = []
        for j, entry in enumerate(items):
            at = f"{where}: field '{name}.{key}[{j}]"
            if not isinstance(entry, Mapping):
                raise DatasetError(f"{at}' must be an object, got {type(entry).__name__}")
            for prompt in _prompts(entry.get("prompt"), f"{at}.prompt'"):
                answer = _first_alias(entry.get("ground_truth"), f"{at}.ground_truth'")
                if answer is not None:  # an empty answer scores nothing (EasyEdit skips it too)
                    pairs.append((prompt, answer))
        if pairs:
            sections[key] = pairs
    return sections


def _flat_pairs(
    item: Mapping[str, Any], prompt_key: str, answer_key: str, where: str
) -> list[Pair]:
    prompts = _prompts(item.get(prompt_key), f"{where}: field {prompt_key!r}")
    answers = item.get(answer_key)
    if isinstance(answers, list) and len(prompts) > 1:  # one answer per prompt
        if len(answers) != len(prompts):
            raise DatasetError(
                f"{where}: field {answer_key!r} has {len(answers)} answers for "
                f"{len(prompts)} prompts in {prompt_key!r}"
            )
        found = [_first_alias(a, f"{where}: field {answer_key!r}") for a in answers]
    else:
        found = [_first_alias(answers, f"{where}: field {answer_key!r}")] * len(prompts)
    if prompts and all(a is None for a in found):
        raise DatasetError(f"{where}: field {answer_key!r} is missing or empty")
    return [(p, a) for p, a in zip(prompts, found, strict=True) if a is not None]
