"""A small in-memory HuggingFace-Hub-compatible HTTP server for the hub tests.

It answers only what huggingface_hub's client sends for neuronpatch.hub: create a repo, repo
info (with file hashes) at a revision, list refs, validate a model card's YAML, preupload
(always "regular": files go inline in the commit, never to LFS/xet), commit (NDJSON), and
resolve (HEAD/GET a file, with the X-Repo-Commit/ETag/Content-Length headers
``hf_hub_download`` needs). Errors carry the X-Error-Code headers the client turns into
RepositoryNotFoundError, RevisionNotFoundError and EntryNotFoundError.

Repos keep every commit, so branches, tags and commit ids all work as revisions. Test knobs:
``corrupt`` (serve a file with one byte flipped, keeping the hash headers), ``down`` (answer
503 to everything), ``lfs`` (describe .safetensors files as LFS objects with a sha256, as
huggingface.co does) and ``requests`` (every request seen).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_sha1(data: bytes) -> str:
    """Git blob id of ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file that stands for ``data`` in git."""
    sha = hashlib.sha256(data).hexdigest()
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
    )


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch, tag or full commit id names."""
        oid = self.branches.get(revision) or self.tags.get(revision) or revision
        return self.commits.get(oid)

    def commit(self, branch: str, files: dict[str, bytes], message: str) -> Commit:
        """Record a commit with the full file set ``files`` on ``branch``."""
        parent = self.branches.get(branch)
        tree = sorted((path, git_sha1(data)) for path, data in files.items())
        oid = hashlib.sha1(json.dumps([parent, message, tree]).encode()).hexdigest()
        self.commits[oid] = Commit(oid, parent, message, dict(files))
        self.branches[branch] = oid
        return self.commits[oid]


class HttpError(Exception):
    """An HTTP error answer: status, X-Error-Code and message."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        body: dict | None = None,
        **headers: str,
    ):
        super().__init__(message)
        self.status, self.code, self.body, self.headers = status, code, body or {}, headers


class FakeHub:
    """The server: ``FakeHub().start()``, then point huggingface_hub at ``hub.url``."""

    def __init__(self, token: str = "hf_test_token", lfs: bool = False):
        self.token = token
        self.lfs = lfs
        self.repos: dict[str, Repo] = {}
        self.corrupt: set[tuple[str, str]] = set()  # (repo_id, path) served with a flipped byte
        self.down = False
        self.requests: list[str] = []  # "METHOD /path", in order
        self.lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- direct helpers for tests ------------------------------------------------------

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        """A repo with the Hub's initial commit (a .gitattributes)."""
        with self.lock:
            repo = self.repos[repo_id] = Repo(repo_id, private)
            repo.commit("main", {".gitattributes": GITATTRIBUTES}, "initial commit")
            return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, revision
        return dict(commit.files)

    # --- endpoints ----------------------------------------------------------------------

    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HttpError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _require_token(self, headers: Any) -> None:
        if headers.get("authorization") != f"Bearer {self.token}":
            message = "Invalid credentials in Authorization header"
            raise HttpError(401, message, **{"X-Error-Message": message})

    def create(self, body: dict, headers: Any) -> dict:
        self._require_token(headers)
        repo_id = f"{body.get('organization') or 'user'}/{body['name']}"
        if repo_id in self.repos:
            url = f"{self.url}/{repo_id}"  # the client reads it even from the 409
            raise HttpError(409, "You already created this model repo", body={"url": url})
        private = body.get("visibility") == "private" or body.get("private") is True
        self.create_repo(repo_id, private)
        return {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def info(self, repo_id: str, revision: str | None) -> dict:
        repo = self._repo(repo_id)
        commit = self._commit(repo, revision or "main")
        return {
            "id": repo_id,
            "modelId": repo_id,
            "sha": commit.oid,
            "private": repo.private,
            "tags": [],
            "siblings": [self._sibling(path, data) for path, data in sorted(commit.files.items())],
        }

    def _is_lfs(self, path: str) -> bool:
        return self.lfs and path.endswith(".safetensors")

    def _sibling(self, path: str, data: bytes) -> dict:
        if not self._is_lfs(path):
            return {"rfilename": path, "size": len(data), "blobId": git_sha1(data)}
        pointer = lfs_pointer(data)
        lfs = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        return {
            "rfilename": path,
            "size": len(data),
            "blobId": git_sha1(pointer),
            "lfs": {**lfs, "pointerSize": len(pointer)},
        }

    def refs(self, repo_id: str) -> dict:
        repo = self._repo(repo_id)

        def listed(refs: dict[str, str], kind: str) -> list[dict]:
            return [
                {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}
                for name, oid in sorted(refs.items())
            ]

        return {
            "branches": listed(repo.branches, "heads"),
            "tags": listed(repo.tags, "tags"),
            "converts": [],
            "pullRequests": [],
        }

    def validate_yaml(self, body: dict) -> dict:
        match = re.match(r"^---\n(.*?)\n---\n", body.get("content", ""), re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as exc:
            raise HttpError(400, f"invalid YAML: {exc}") from None
        if not isinstance(metadata, dict):
            raise HttpError(400, "metadata must be a mapping")
        return {"errors": [], "warnings": []}

    def preupload(self, repo_id: str, revision: str, body: dict, headers: Any) -> dict:
        self._require_token(headers)
        commit = self._commit(self._repo(repo_id), revision)
        files = []
        for item in body["files"]:
            existing = commit.files.get(item["path"])
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "regular",  # inline in the commit: no LFS, no xet
                    "shouldIgnore": False,
                    "oid": git_sha1(existing) if existing is not None else None,
                }
            )
        return {"files": files, "commitOid": commit.oid}

    def commit(self, repo_id: str, branch: str, raw: bytes, headers: Any) -> dict:
        self._require_token(headers)
        repo = self._repo(repo_id)
        if branch not in repo.branches:
            raise HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        header, operations = lines[0]["value"], lines[1:]
        parent = header.get("parentCommit")
        if parent is not None and parent != repo.branches[branch]:
            raise HttpError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[repo.branches[branch]].files)
        for op in operations:
            key, value = op["key"], op["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:
                raise HttpError(400, f"operation {key!r} is not supported by this test server")
        commit = repo.commit(branch, files, header["summary"])
        return {
            "commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}",
            "commitOid": commit.oid,
            "success": True,
        }

    def resolve(self, repo_id: str, revision: str, path: str) -> tuple[bytes, dict[str, str]]:
        commit = self._commit(self._repo(repo_id), revision)
        data = commit.files.get(path)
        if data is None:
            raise HttpError(
                404, "Entry not found", "EntryNotFound", **{"X-Repo-Commit": commit.oid}
            )
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{git_sha1(data)}"',
            "Content-Type": "application/octet-stream",
        }
        if self._is_lfs(path):
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        if (repo_id, path) in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]  # same length, different bytes
        return data, headers


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    """The request handler class: routes each request to a FakeHub endpoint."""
    routes: list[tuple[str, re.Pattern[str], Callable[..., Any]]] = [
        ("POST", re.compile(r"^/api/repos/create$"), lambda h, m: hub.create(h.json(), h.headers)),
        ("GET", re.compile(rf"^/api/models/{_REPO}/refs$"), lambda h, m: hub.refs(m["repo"])),
        (
            "GET",
            re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"),
            lambda h, m: hub.info(m["repo"], m["rev"]),
        ),
        ("POST", re.compile(r"^/api/validate-yaml$"), lambda h, m: hub.validate_yaml(h.json())),
        (
            "POST",
            re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"),
            lambda h, m: hub.preupload(m["repo"], m["rev"], h.json(), h.headers),
        ),
        (
            "POST",
            re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"),
            lambda h, m: hub.commit(m["repo"], m["rev"], h.body(), h.headers),
        ),
        (
            "GET",
            re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"),
            lambda h, m: hub.resolve(m["repo"], m["rev"], m["path"]),
        ),
    ]

    class Handler(BaseHTTPRequestHandler):
        def body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def json(self) -> dict:
            return json.loads(self.body() or b"{}")

        def _dispatch(self, method: str) -> None:
            hub.requests.append(f"{method} {self.path}")
            path = urlsplit(self.path).path
            try:
                if hub.down:
                    raise HttpError(503, "Service Unavailable")
                for verb, pattern, endpoint in routes:
                    match = pattern.match(path)
                    if match and (verb == method or (verb == "GET" and method == "HEAD")):
                        groups = {k: unquote(v) if v else v for k, v in match.groupdict().items()}
                        with hub.lock:
                            result = endpoint(self, groups)
                        break
                else:
                    raise HttpError(404, f"no route for {method} {path}")
            except HttpError as exc:
                headers = dict(exc.headers)
                if exc.code:
                    headers["X-Error-Code"] = exc.code
                headers.setdefault("X-Error-Message", str(exc))
                self._send(
                    exc.status,
                    json.dumps({"error": str(exc), **exc.body}).encode(),
                    headers,
                    method,
                )
                return
            if isinstance(result, tuple):  # raw bytes (resolve)
                self._send(200, result[0], result[1], method)
            else:
                headers = {"Content-Type": "application/json"}
                self._send(200, json.dumps(result).encode(), headers, method)

        def _send(self, status: int, data: bytes, headers: dict[str, str], method: str) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
            pass  # hub.requests records every request; keep pytest's output clean

    return Handler
