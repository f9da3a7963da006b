"""Sharing patches through the HuggingFace Hub: push with a model card, pull, ``hf://`` addresses.

A Hub model repo holds any number of patch files (``*.safetensors``) and a model card
(``README.md``) whose edit table is rebuilt from *every* patch in the repo on each push, so it
never drifts from the files. The patch and the card go up in one commit.

Addresses follow huggingface_hub's own ``hf://`` grammar, restricted to model repos::

    hf://user/repo                              the only patch in the repo (on main)
    hf://user/repo/edits/france.safetensors     one file
    hf://user/repo@v1/france.safetensors        at a branch, tag or commit
    hf://user/repo@refs/pr/3/france.safetensors special refs keep their slashes; other
                                                revisions with a '/' are written %2F-encoded

Downloads go through huggingface_hub's cache (``hf_hub_download``), so a patch fetched once
loads offline (``HF_HUB_OFFLINE=1``) or when the Hub cannot be reached. Every download is
checked against the hash the Hub reports for the file (the git blob SHA-1, or the LFS SHA-256);
offline, against the hash the cache stored the file under. The endpoint, token and offline mode
come from huggingface_hub's usual settings (``HF_ENDPOINT``, ``HF_TOKEN`` or ``hf auth login``,
``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from .errors import (
    AmbiguousHubPatchError,
    HubError,
    HubIntegrityError,
    HubNotFoundError,
    NeuronpatchError,
    PatchFileError,
    PickleRefusedError,
)

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from .patch import BaseModelInfo, Patch

# Hub ids of the models neuronpatch embeds (see models.EMBEDDED): the GGUFs are quantised
# copies of these checkpoints, and a model card's `base_model` must name a Hub repo.
HUB_BASE_MODELS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m",
}
CARD_TAGS = ("knowledge-editing", "model-editing", "neuronpatch")
PATCH_SUFFIX = ".safetensors"

# A .safetensors file this large is model weights, not a patch (patches are kilobytes): the
# card and `neuronpatch pull user/repo` leave it alone rather than download it.
_MAX_PATCH_BYTES = 64 * 1024 * 1024
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_SPECIAL_REF = re.compile(r"^refs/(?:pr/\d+|convert/[\w.-]+)")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PUSH_ATTEMPTS = 3  # a concurrent push moves the parent commit; rebuild the card and retry


# --- addresses -------------------------------------------------------------------------


@dataclass(frozen=True)
class HubAddress:
    """A parsed ``hf://user/repo[@revision][/path.safetensors]`` address."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return format_address(self.repo_id, self.filename, self.revision)


def format_address(repo_id: str, filename: str | None = None, revision: str | None = None) -> str:
    """The ``hf://`` address of a repo, or of a file in it, at an optional revision."""
    text = f"hf://{repo_id}"
    if revision:
        text += "@" + (revision if _SPECIAL_REF.fullmatch(revision) else quote(revision, safe=""))
    return f"{text}/{filename}" if filename else text


def parse_address(address: str) -> HubAddress:
    """Split an ``hf://`` address into repo id, file and revision; HubError if malformed."""
    usage = (
        f"not a Hub patch address: {address!r}; expected "
        "hf://user/repo[@revision][/file.safetensors], e.g. hf://user/edits/france.safetensors"
    )
    if not address.startswith("hf://"):
        raise HubError(usage)
    rest = address[len("hf://") :]
    first = rest.split("/", 1)[0]
    if first in ("datasets", "spaces", "kernels", "buckets"):
        raise HubError(f"{address}: patches live in model repos, not {first}; use hf://user/repo")
    if first == "models" and rest.count("/") >= 2:
        rest = rest[len("models/") :]  # the explicit type prefix of huggingface_hub's grammar
    match = re.match(r"^([^/@]+)/([^/@]+)(.*)$", rest)
    if match is None:
        raise HubError(usage)
    repo_id, tail = f"{match.group(1)}/{match.group(2)}", match.group(3)
    revision = None
    if tail.startswith("@"):
        tail = tail[1:]
        special = _SPECIAL_REF.match(tail)
        if special:
            revision, tail = special.group(0), tail[special.end() :]
        else:
            revision, slash, after = tail.partition("/")
            tail = slash + after
        revision = unquote(revision)
        if not revision:
            raise HubError(f"{usage} (the revision after '@' is empty)")
    if tail and not tail.startswith("/"):
        raise HubError(usage)
    filename = tail[1:] or None
    _check_repo_id(repo_id)
    if filename is not None:
        _check_path(filename, address)
    return HubAddress(repo_id, filename, revision)


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise HubError(
            f"invalid Hub repo id {repo_id!r}: expected 'user/name' (letters, digits, '-', '_', '.')"
        )
    if "--" in repo_id:
        raise HubError(f"invalid Hub repo id {repo_id!r}: the Hub does not allow '--' in names")


def _check_path(filename: str, where: str) -> None:
    parts = PurePosixPath(filename).parts
    if (
        not filename
        or filename.startswith("/")
        or "\\" in filename
        or "//" in filename
        or any(p in (".", "..") for p in parts)
    ):
        raise HubError(f"{where}: {filename!r} is not a valid file path inside a Hub repo")
    if filename.lower().endswith(_PICKLE_SUFFIXES):
        raise PickleRefusedError(
            f"{where}: {filename} is a pickle file; neuronpatch never downloads or unpickles "
            "pickles. Patches are .safetensors files"
        )


# --- hashes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Expected:
    """What some authority says a file's hash is."""

    kind: str  # "sha256" (LFS object id) or "git-sha1" (git blob id)
    value: str
    said_by: str  # who says so, for messages

    def actual(self, data: bytes) -> str:
        if self.kind == "sha256":
            return hashlib.sha256(data).hexdigest()
        return git_blob_sha1(data)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of ``data`` as a blob (what the Hub reports for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _expected_from_sibling(sibling: Any, endpoint: str) -> _Expected | None:
    lfs = getattr(sibling, "lfs", None)
    sha256 = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
    if sha256:
        return _Expected("sha256", sha256, f"{endpoint} (LFS sha256)")
    if getattr(sibling, "blob_id", None):
        return _Expected("git-sha1", sibling.blob_id, f"{endpoint} (git blob id)")
    return None


def _expected_from_cache(pointer: str) -> _Expected | None:
    """The hash the cache stored the file under (its blob is named by the Hub's ETag)."""
    blob = Path(os.path.realpath(pointer)).name
    said_by = "the huggingface_hub cache (blob named after the hash the Hub reported)"
    if _SHA256.match(blob):
        return _Expected("sha256", blob, said_by)
    if _COMMIT.match(blob):
        return _Expected("git-sha1", blob, said_by)
    return None  # no symlinks (e.g. Windows without developer mode): nothing to compare to


def _evict(pointer: str) -> bool:
    """Remove a corrupted file (its snapshot entry and blob) from the cache; True if removed."""
    try:
        blob = os.path.realpath(pointer)
        os.unlink(pointer)
        if blob != os.path.abspath(pointer) and os.path.exists(blob):
            os.unlink(blob)
    except OSError:
        return False
    return True


# --- what a revision holds -------------------------------------------------------------


@dataclass(frozen=True)
class _RemoteFile:
    size: int | None
    expected: _Expected | None


@dataclass(frozen=True)
class _Snapshot:
    """The files of a repo at one commit: from the Hub, or (offline) from the local cache."""

    repo_id: str
    revision: str | None  # as asked; None = the default branch
    commit: str
    files: dict[str, _RemoteFile]
    cached_only: bool = False

    @property
    def where(self) -> str:
        text = format_address(self.repo_id, None, self.revision)
        return f"{text} (local cache, commit {self.commit[:12]})" if self.cached_only else text

    @property
    def patch_files(self) -> list[str]:
        return sorted(f for f in self.files if f.lower().endswith(PATCH_SUFFIX))

    def pick(self, filename: str | None) -> str:
        """``filename`` if the snapshot has it, else the only patch; errors list what exists."""
        patches = self.patch_files
        if filename is None:
            if len(patches) == 1:
                return patches[0]
            if not patches:
                raise HubNotFoundError(
                    f"{self.where} holds no .safetensors patch (files: "
                    f"{', '.join(sorted(self.files)) or 'none'}); check the repo id and revision"
                )
            raise AmbiguousHubPatchError(
                f"{self.where} holds {len(patches)} patches: {', '.join(patches)}; name one, "
                f"e.g. {format_address(self.repo_id, patches[0], self.revision)}"
            )
        if filename not in self.files:
            raise HubNotFoundError(
                f"{self.where} has no file {filename!r}; its patches are: "
                f"{', '.join(patches) or 'none'}"
            )
        return filename


def _api(token: str | bool | None) -> HfApi:
    from huggingface_hub import HfApi

    return HfApi(token=token)  # endpoint: huggingface_hub.constants.ENDPOINT (HF_ENDPOINT)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _unreachable(exc: BaseException) -> bool:
    """Whether a client error means "the Hub could not be asked" rather than a Hub answer."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    if isinstance(exc, (HFValidationError, NeuronpatchError)):
        return False
    if isinstance(exc, HfHubHTTPError):
        response = getattr(exc, "response", None)
        return response is None or response.status_code >= 500
    return _is_transport(exc)


def _is_transport(exc: BaseException) -> bool:
    """Connection refused, DNS, timeout, TLS, offline mode: the request never got an answer."""
    package = type(exc).__module__.split(".")[0]
    return isinstance(exc, OSError) or package in ("httpx", "httpx2", "httpcore", "requests")


def _snapshot(
    repo_id: str, revision: str | None, token: str | bool | None, *, cache_fallback: bool = True
) -> _Snapshot:
    """The repo's files at ``revision``; offline (or Hub unreachable) from the local cache."""
    if _offline():
        if not cache_fallback:
            raise HubError(
                f"offline mode is on (HF_HUB_OFFLINE=1): cannot ask the Hub about {repo_id}; "
                "unset HF_HUB_OFFLINE"
            )
        return _cached_snapshot(repo_id, revision, "offline mode is on (HF_HUB_OFFLINE=1)")
    api = _api(token)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:
        if not (cache_fallback and _unreachable(exc)):
            raise _translate(exc, api, repo_id, revision, f"looking up {repo_id}") from None
        reason = f"could not reach {api.endpoint} ({_brief(exc)})"
        snapshot = _cached_snapshot(repo_id, revision, reason)
        warnings.warn(f"{reason}; using the cached {snapshot.where}", UserWarning, stacklevel=3)
        return snapshot
    files = {
        s.rfilename: _RemoteFile(s.size, _expected_from_sibling(s, api.endpoint))
        for s in info.siblings or []
    }
    if not info.sha:
        raise HubError(f"{api.endpoint} did not report a commit for {repo_id}; is it a Hub?")
    return _Snapshot(repo_id, revision, info.sha, files)


def _cached_snapshot(repo_id: str, revision: str | None, reason: str) -> _Snapshot:
    """The snapshot of ``revision`` in huggingface_hub's cache (its documented layout)."""
    from huggingface_hub import constants

    storage = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    commit = rev if _COMMIT.match(rev) else None
    ref = storage / "refs" / rev
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    folder = storage / "snapshots" / commit if commit else None
    if folder is None or not folder.is_dir():
        raise HubNotFoundError(
            f"{format_address(repo_id, None, revision)} is not in the local huggingface_hub cache "
            f"({constants.HF_HUB_CACHE}) and {reason}; download it once with network access "
            "(and HF_HUB_OFFLINE unset), then it loads offline"
        )
    files = {
        p.relative_to(folder).as_posix(): _RemoteFile(p.stat().st_size, None)
        for p in folder.rglob("*")
        if p.is_file()
    }
    return _Snapshot(repo_id, revision, commit, files, cached_only=True)


def _fetch(snapshot: _Snapshot, filename: str, token: str | bool | None) -> tuple[bytes, str]:
    """Download (or read from the cache) one file of ``snapshot`` and verify its hash.

    Returns the bytes and the commit they came from.
    """
    from huggingface_hub import constants, hf_hub_download

    address = format_address(snapshot.repo_id, filename, snapshot.revision)
    with _hub_errors(snapshot.repo_id, snapshot.revision, f"downloading {address}", token):
        if snapshot.cached_only:
            pointer = hf_hub_download(
                snapshot.repo_id, filename, revision=snapshot.commit, local_files_only=True
            )
        else:
            # By name, not by commit, so the cache records the revision for offline use later.
            pointer = hf_hub_download(
                snapshot.repo_id,
                filename,
                revision=snapshot.revision,
                token=token,
                endpoint=constants.ENDPOINT,
            )
    commit = _commit_of(pointer, filename) or snapshot.commit
    expected = snapshot.files[filename].expected
    if commit != snapshot.commit and not snapshot.cached_only:
        # The branch moved between the listing and the download: ask about that commit.
        moved = _snapshot(snapshot.repo_id, commit, token, cache_fallback=False)
        expected = moved.files[filename].expected if filename in moved.files else None
    expected = expected or _expected_from_cache(pointer)
    data = Path(pointer).read_bytes()
    if expected is not None and expected.actual(data) != expected.value:
        got = expected.actual(data)
        fix = (
            "The corrupted copy was removed from the huggingface_hub cache; retry."
            if _evict(pointer)
            else f"Delete {os.path.realpath(pointer)} from the huggingface_hub cache and retry."
        )
        raise HubIntegrityError(
            f"{address} (commit {commit[:12]}): the downloaded bytes have {expected.kind} "
            f"{got}, but {expected.said_by} says {expected.value}. The download was corrupted "
            f"in transit or in the cache. {fix}"
        )
    return data, commit


def _commit_of(pointer: str, filename: str) -> str | None:
    """The commit of a cache path ``.../snapshots/<commit>/<filename>``."""
    depth = len(PurePosixPath(filename).parts)
    name = Path(pointer).parents[depth - 1].name
    return name if _COMMIT.match(name) else None


# --- error translation -----------------------------------------------------------------


def _brief(exc: BaseException) -> str:
    text = getattr(exc, "server_message", None) or str(exc) or type(exc).__name__
    return text.strip().splitlines()[0]


def _translate(
    exc: BaseException, api: HfApi | None, repo_id: str, revision: str | None, action: str
) -> NeuronpatchError:
    """A neuronpatch error for a huggingface_hub failure, saying what to do about it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = api.endpoint if api is not None else constants.ENDPOINT
    if isinstance(exc, NeuronpatchError):
        return exc
    if isinstance(exc, RepositoryNotFoundError):
        return HubNotFoundError(
            f"model repo {repo_id!r} not found on {endpoint} (or it is private or gated and "
            "your token cannot see it); check the name, or log in (`hf auth login` or HF_TOKEN)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubNotFoundError(
            f"{repo_id} has no revision {revision!r}; {_refs(api, repo_id)}"
            if api is not None
            else f"{repo_id} has no revision {revision!r}"
        )
    if isinstance(exc, LocalEntryNotFoundError):
        return HubNotFoundError(
            f"{action}: not in the local huggingface_hub cache and the Hub cannot be used "
            f"({_brief(exc)}); connect once (with HF_HUB_OFFLINE unset) to download it"
        )
    if isinstance(exc, EntryNotFoundError):
        return HubNotFoundError(f"{action}: the file does not exist on {endpoint} ({_brief(exc)})")
    if isinstance(exc, HFValidationError):
        return HubError(f"{action}: {_brief(exc)}")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if getattr(exc, "response", None) is not None else None
        if status in (401, 403):
            return HubError(
                f"{action}: {endpoint} refused the request (HTTP {status}: {_brief(exc)}); log "
                "in with a token that may write to this repo (`hf auth login` or HF_TOKEN)"
            )
        return HubError(f"{action}: {endpoint} answered HTTP {status}: {_brief(exc)}")
    if _offline():
        return HubError(f"{action}: offline mode is on (HF_HUB_OFFLINE=1); unset it to use the Hub")
    if not _is_transport(exc):
        return HubError(
            f"{action}: unexpected answer from {endpoint} ({type(exc).__name__}: {_brief(exc)}); "
            "is HF_ENDPOINT a HuggingFace Hub?"
        )
    return HubError(
        f"{action}: could not reach {endpoint} ({type(exc).__name__}: {_brief(exc)}); check the "
        "network, or HF_ENDPOINT if you use a mirror"
    )


def _refs(api: HfApi, repo_id: str) -> str:
    """ "it has branches ..., tags ..." for messages, best effort."""
    try:
        refs = api.list_repo_refs(repo_id)
    except Exception:
        return "check the branch, tag or commit name"
    branches = ", ".join(r.name for r in refs.branches) or "none"
    tags = ", ".join(r.name for r in refs.tags) or "none"
    return f"it has branches: {branches}; tags: {tags} (or give a full commit id)"


@contextmanager
def _hub_errors(
    repo_id: str, revision: str | None, action: str, token: str | bool | None = None
) -> Iterator[None]:
    """Turn any huggingface_hub failure inside the block into a neuronpatch HubError."""
    try:
        yield
    except NeuronpatchError:
        raise
    except Exception as exc:
        raise _translate(exc, _api(token), repo_id, revision, action) from None


# --- pull ------------------------------------------------------------------------------


def from_hub(
    repo_id: str,
    filename: str | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
) -> Patch:
    """Download (through the huggingface_hub cache) and validate a patch.

    ``filename`` None takes the repo's only ``.safetensors`` file (AmbiguousHubPatchError when
    there are several, listing them). The bytes are checked against the hash the Hub reports
    (HubIntegrityError on mismatch); a missing repo, revision or file raises HubNotFoundError.
    Offline (``HF_HUB_OFFLINE=1``) or with the Hub unreachable, the cached copy is used.
    """
    from .patch import Patch

    _check_repo_id(repo_id)
    if filename is not None:
        _check_path(filename, format_address(repo_id, None, revision))
    snapshot = _snapshot(repo_id, revision, token)
    filename = snapshot.pick(filename)
    data, _ = _fetch(snapshot, filename, token)
    return Patch.from_bytes(data, source=format_address(repo_id, filename, revision))


def load_hf(address: str) -> Patch:
    """A Patch from ``hf://user/repo[@revision][/file.safetensors]`` (token from HF_TOKEN/login)."""
    parsed = parse_address(address)
    return from_hub(parsed.repo_id, parsed.filename, revision=parsed.revision)


# --- push ------------------------------------------------------------------------------


def default_filename(patch: Patch) -> str:
    """``<subject>-<target_new>-<patch id[:8]>.safetensors`` from the first edit request."""
    words = ""
    if patch.requests:
        first = patch.requests[0]
        words = f"{first.get('subject', '')} {first.get('target_new', '')}"
    return f"{_slug(words) or 'patch'}-{patch.patch_id[:8]}{PATCH_SUFFIX}"


def _slug(text: str, width: int = 48) -> str:
    ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:width].rstrip("-")


def hub_base_model(base: BaseModelInfo) -> str | None:
    """The Hub id of a patch's base model, or None when it is a local path."""
    name = base.name_or_path
    if name in HUB_BASE_MODELS:
        return HUB_BASE_MODELS[name]
    if _REPO_ID.match(name) and not Path(name).exists():
        return name
    return None


def push_to_hub(
    patch: Patch,
    repo_id: str,
    filename: str | None = None,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload ``patch`` and refresh the repo's model card; returns the file's URL.

    Creates the model repo if it does not exist. The card's edit table is rebuilt from every
    patch in the repo plus this one, and the patch and the card go up in one commit.
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    _check_repo_id(repo_id)
    filename = filename or default_filename(patch)
    _check_path(filename, f"push to {repo_id}")
    if not filename.lower().endswith(PATCH_SUFFIX):
        raise HubError(f"patch files on the Hub end in {PATCH_SUFFIX}; got {filename!r}")
    if _offline():
        raise HubError(
            f"offline mode is on (HF_HUB_OFFLINE=1): cannot push to {repo_id}; unset it to push"
        )
    api = _api(token)
    data = patch.to_bytes()
    message = commit_message or f"Add patch {filename}" + (
        f": {patch.requests[0].get('prompt', '')} -> {patch.requests[0].get('target_new', '')}"
        if patch.requests
        else ""
    )
    with _hub_errors(repo_id, None, f"creating the model repo {repo_id}", token):
        api.create_repo(repo_id, private=private, exist_ok=True)
    for attempt in range(_PUSH_ATTEMPTS):
        snapshot = _snapshot(repo_id, None, token, cache_fallback=False)
        others = [(name, p) for name, p in _repo_patches(snapshot, token) if name != filename]
        card = model_card(repo_id, [*others, (filename, patch)])
        operations = [
            CommitOperationAdd(path_in_repo=filename, path_or_fileobj=data),
            CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()),
        ]
        try:
            api.create_commit(
                repo_id,
                operations,
                commit_message=message,
                parent_commit=snapshot.commit,
            )
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (409, 412) and attempt + 1 < _PUSH_ATTEMPTS:
                continue  # someone pushed in between: re-read the repo, rebuild the card
            raise _translate(exc, api, repo_id, None, f"pushing {filename} to {repo_id}") from None
        except NeuronpatchError:
            raise
        except Exception as exc:
            raise _translate(exc, api, repo_id, None, f"pushing {filename} to {repo_id}") from None
        break
    return f"{api.endpoint}/{repo_id}/blob/main/{quote(filename)}"


def _repo_patches(snapshot: _Snapshot, token: str | bool | None) -> list[tuple[str, Patch]]:
    """Every patch in ``snapshot`` (downloaded and verified); other .safetensors are skipped."""
    from .patch import Patch

    found = []
    for name in snapshot.patch_files:
        size = snapshot.files[name].size
        if size is not None and size > _MAX_PATCH_BYTES:
            continue
        data, _ = _fetch(snapshot, name, token)
        try:
            found.append(
                (name, Patch.from_bytes(data, source=format_address(snapshot.repo_id, name)))
            )
        except PatchFileError:
            continue  # e.g. model weights next to the patches: not listed in the card
    return found


# --- model card ------------------------------------------------------------------------


def model_card(repo_id: str, patches: Sequence[tuple[str, Patch]]) -> str:
    """The README.md for a repo holding ``patches`` ((filename, Patch) pairs): YAML front
    matter (base_model, library_name, tags), a table of the edits, and how to apply one."""
    from huggingface_hub import ModelCard, ModelCardData

    ordered = sorted(patches, key=lambda item: (item[1].created, item[0]))
    bases = list(dict.fromkeys(b for _, p in ordered if (b := hub_base_model(p.base))))
    extra_tags = sorted({p.method for _, p in ordered} | {p.base.model_type for _, p in ordered})
    data = ModelCardData(
        base_model=bases[0] if len(bases) == 1 else (bases or None),
        library_name="neuronpatch",
        tags=list(dict.fromkeys([*CARD_TAGS, *(_slug(t, 64) for t in extra_tags if _slug(t))])),
    )
    header = "| file | prompt | subject | target_new | target_true | method | layers | neurons | params |"
    rows = [header, "|" + "---|" * 9]
    for name, patch in ordered:
        sizes = [
            patch.method,
            ", ".join(str(layer) for layer in patch.layers) or "-",
            f"{patch.num_neurons:,}",
            f"{patch.num_params:,}",
        ]
        for i, request in enumerate(patch.requests or [{}]):
            fields = [request.get(k) or "-" for k in ("prompt", "subject", "target_new")]
            fields.append(request.get("target_true") or "-")
            link = f"[{_cell(name)}]({quote(name)})" if i == 0 else '"'
            rows.append(
                "| "
                + " | ".join([link, *map(_cell, fields), *(sizes if i == 0 else ['"'] * 4)])
                + " |"
            )
    example_name, example = ordered[-1]
    base_text = ", ".join(f"[{b}](https://huggingface.co/{b})" for b in bases) or ", ".join(
        sorted({f"`{p.base.name_or_path}`" for _, p in ordered})
    )
    count = f"{len(ordered)} patch" + ("" if len(ordered) == 1 else "es")
    body = f"""
# {repo_id.split("/")[1]}

{count} for {base_text}, made with [neuronpatch](https://pypi.org/project/neuronpatch/).
Each file edits what the model says about one fact (or a few) as per-neuron deltas on the FFN
output projection of a few layers. A forward hook adds them at run time; the base weights are
never modified, and removing the patch restores the original logits bit for bit.

## Edits

{chr(10).join(rows)}

## Use

```python
import neuronpatch

model, tok = neuronpatch.load_model("{example.base.name_or_path}")
model = neuronpatch.apply(model, "{format_address(repo_id, example_name)}")
```

Other patches: change the file name. Download one with
`neuronpatch pull {repo_id}/{example_name} -o edits/`; remove it with `neuronpatch.remove(model)`.

This card is generated by `neuronpatch push` from the patch files in this repo.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _cell(value: Any) -> str:
    """Text safe inside a markdown table cell."""
    text = " ".join(str(value).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


# --- command line ----------------------------------------------------------------------


def cmd_push(args: argparse.Namespace) -> int:
    from .patch import Patch

    patch = Patch.load(args.patch)
    url = push_to_hub(
        patch,
        args.repo,
        args.filename,
        private=True if args.private else None,
        commit_message=args.message,
    )
    filename = args.filename or default_filename(patch)
    print(url)
    print(
        f"apply with: neuronpatch.apply(model, {format_address(args.repo, filename)!r})",
        file=sys.stderr,
    )
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .patch import Patch

    text = args.address if args.address.startswith("hf://") else f"hf://{args.address}"
    address = parse_address(text)
    if address.revision and args.revision and address.revision != args.revision:
        raise HubError(
            f"two revisions given: {address.revision!r} in the address and "
            f"{args.revision!r} with --revision; give one"
        )
    revision = address.revision or args.revision
    snapshot = _snapshot(address.repo_id, revision, None)
    if address.filename is not None:
        names = [snapshot.pick(address.filename)]
    else:
        names = snapshot.patch_files
        if not names:
            snapshot.pick(None)  # raises, listing what the repo holds
    out = Path(args.output)
    wrote = 0
    for name in names:
        size = snapshot.files[name].size
        if address.filename is None and size is not None and size > _MAX_PATCH_BYTES:
            print(f"skipped {name}: {size:,} bytes is model weights, not a patch", file=sys.stderr)
            continue
        data, commit = _fetch(snapshot, name, None)
        source = format_address(address.repo_id, name, revision)
        try:
            patch = Patch.from_bytes(data, source=source)
        except PatchFileError as exc:
            if address.filename is not None:
                raise
            print(f"skipped {name}: {exc}", file=sys.stderr)
            continue
        path = patch.save(out / name)
        wrote += 1
        print(f"{path}  ({source} @ {commit[:12]}, {len(data):,} bytes)")
    if not wrote:
        raise HubNotFoundError(f"{snapshot.where}: no patch could be pulled")
    return 0


def add_subparsers(sub: argparse._SubParsersAction) -> None:
    """The ``push`` and ``pull`` commands."""
    p = sub.add_parser(
        "push",
        help="upload a patch to a Hub model repo and update its model card",
        description=(
            "Upload a patch to a HuggingFace Hub model repo (created if missing) and rewrite the "
            "repo's model card so its table lists every patch in the repo; both in one commit. "
            "Prints the file's URL. Endpoint and token come from HF_ENDPOINT and HF_TOKEN "
            "(or `hf auth login`)."
        ),
    )
    p.add_argument("patch", help="the patch file (.safetensors)")
    p.add_argument("repo", help="Hub model repo, user/name")
    p.add_argument(
        "--filename",
        help="path in the repo (default: <subject>-<target>-<patch id>.safetensors)",
    )
    p.add_argument(
        "--private",
        action="store_true",
        help="create the repo private (an existing repo keeps its visibility)",
    )
    p.add_argument("--message", help="commit message (default: 'Add patch <file>: ...')")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser(
        "pull",
        help="download patches from a Hub repo into a folder",
        description=(
            "Download patches from a HuggingFace Hub model repo, verify them against the hashes "
            "the Hub reports, and write them into a folder. user/repo pulls every patch in the "
            "repo; user/repo/file.safetensors pulls one. Works offline for files already in the "
            "huggingface_hub cache."
        ),
    )
    p.add_argument(
        "address",
        metavar="REPO[/FILE]",
        help="user/repo, user/repo/file.safetensors, or an hf://user/repo[@rev][/file] address",
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write into")
    p.add_argument("--revision", help="branch, tag or commit to pull from (default: main)")
    p.set_defaults(func=cmd_pull)
