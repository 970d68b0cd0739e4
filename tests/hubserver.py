"""A Hugging Face Hub-compatible loopback server, for tests.

The real ``huggingface_hub`` client and ``transformers`` accept it through ``HF_ENDPOINT``
(set before importing them; add ``HF_HUB_DISABLE_XET=1`` and ``NO_PROXY=127.0.0.1,localhost``)::

    with HubServer() as hub:
        sha = hub.add_repo("org/tiny-bert", tmp_path / "bert")
        env = {"HF_ENDPOINT": hub.base_url, ...}
        # snapshot_download("org/tiny-bert") in a subprocess with that environment

It is built on ``fileserver.FileServer`` (same HTTP/1.1 machinery, ``Range``/``If-Range``,
throttling, fault classes and request log); only the routing is the Hub's.

Repositories
------------
Model repos only, ids ``org/name`` or ``name``. ``add_repo`` makes branch ``main`` with one
commit; ``push`` adds commits (old ones stay resolvable by sha); ``add_tag`` names one. Commit,
tree and blob ids are real git object ids (sha1 of the git objects the same content and
metadata would give, with a fixed author and dates), so they are deterministic. A file is LFS
when it is at least ``lfs_threshold`` bytes or has a weight/binary extension (``LFS_EXTENSIONS``):
its tree entry carries ``lfs: {oid: sha256, size, pointerSize}`` and its ``oid`` is the git sha1
of its real LFS pointer text. Files given as ``Path`` are streamed from disk on each request and
must not change afterwards.

Endpoints (GET, and HEAD with the same headers)
------------------------------------------------
* ``/api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: model info (``id``,
  ``sha``, ``siblings``, ``private``, ``gated``, ``lastModified``, ...; ``?blobs=true`` adds
  ``size``/``blobId``/``lfs`` to siblings).
* ``/api/models/{repo}/tree/{rev}[/{path}]?recursive=&expand=``: entries in path order
  (directories included), pages of ``page_size`` entries linked with ``Link: <...>; rel="next"``
  (``expand=true`` adds ``lastCommit`` and ``securityFileStatus``). A path that is not a
  directory: 404 ``EntryNotFound``.
* ``POST /api/models/{repo}/paths-info/{rev}`` (form fields ``paths``, ``expand``): entries of
  the paths that exist.
* ``/api/models/{repo}/refs`` and ``/api/models/{repo}/commits/{rev}`` (paged like the tree).
* ``/{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag`` (``"<sha256>"``
  for LFS files, ``"<git blob sha1>"`` otherwise), ``Content-Length``, ``Accept-Ranges``;
  ``Range`` gives 206 / 416 as in ``FileServer``. With ``redirect_lfs_to(url)``, LFS files answer
  302 to ``{url}/{sha256}`` carrying ``X-Linked-Size``, ``X-Linked-Etag``, ``X-Repo-Commit`` and
  ``ETag`` (both etags are the quoted sha256), like the real Hub's CDN redirect. The client
  follows a cross-origin 302 without its ``Authorization`` header. ``Last-Modified`` is one fixed
  date for every file.

``rev`` is a branch, a tag or a full 40-hex commit sha (percent-encoded ``/`` in a revision is
decoded, so ``refs%2Fpr%2F1`` is looked up as ``refs/pr/1``, which never exists). Never
advertises Xet.

Errors: JSON ``{"error": msg}`` with ``X-Error-Code``/``X-Error-Message``: 404 ``RepoNotFound``
(unknown repo), 404 ``RevisionNotFound``, 404 ``EntryNotFound`` (with ``X-Repo-Commit``). A
private repo answers 401 without ``Authorization: Bearer <token>`` (``RepoNotFound``, or
``GatedRepo`` when added with ``gated=True``) and 403 with a wrong token.

``add_listing_entries(repo, entries)`` appends raw entries to the recursive root listing (a
duplicate path, a file that is also a directory): what a broken Hub could send.

Faults
------
``answer_api(repo, code, headers)`` makes every API request about ``repo`` (model info,
revision, tree...) answer ``code`` with ``headers`` and a JSON ``{"error": ...}`` body, no
``X-Error-Code`` unless given: a 302 with ``Location``, a bare 404, a 503 (``None``: normal
answers again).

``set_faults(repo, path, faults)`` arms ``fileserver`` faults for GET ``resolve`` of that path
(whatever the revision), with ``FileServer``'s semantics: HEAD is never faulted; ``Status(404)``
answers like a missing entry (``EntryNotFound`` + ``X-Repo-Commit``). On a 302 (LFS redirect)
only ``Status`` acts; other faults are used up without effect.

Request log
-----------
``requests`` is the ``fileserver.RequestRecord`` log (method, decoded path, raw ``query``,
headers, status, ``range_start``, ``body_bytes_sent``); ``count``/``bytes_sent`` match on a
substring of the decoded path.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import re
import shutil
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from fileserver import (
    ChangeAfterFirst,
    Fault,
    FileServer,
    RequestRecord,
    Status,
    _Entry,
    _Handler,
    _Plan,
    _Stopped,
    _Version,
)

__all__ = ["LFS_EXTENSIONS", "HubFile", "HubServer", "lfs_pointer"]

LFS_EXTENSIONS = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".model", ".pkl"}
)
_SHA_RE = re.compile(r"[0-9a-f]{40}")
_EPOCH = 1_700_000_000  # commit n of a repo is dated _EPOCH + 60 * n
_AUTHOR = "modelhost-tests <tests@modelhost.invalid>"
_DEFAULT_PAGE = 1000


# --------------------------------------------------------------------------- git objects


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The text git stores for an LFS file (its blob oid is the entry's ``oid``)."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
    ).encode()


def _git_sha1(kind: str, body: bytes) -> str:
    return hashlib.sha1(f"{kind} {len(body)}\0".encode() + body).hexdigest()


_HASH_CACHE: dict[tuple[str, int, int], tuple[str, str]] = {}
_HASH_LOCK = threading.Lock()


def _digests(data: bytes | Path) -> tuple[str, str, int]:
    """(git blob sha1 of the content, sha256, size); files are hashed once per process."""
    if isinstance(data, bytes):
        return _git_sha1("blob", data), hashlib.sha256(data).hexdigest(), len(data)
    st = data.stat()
    key = (str(data.resolve()), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        cached = _HASH_CACHE.get(key)
    if cached is None:
        sha1 = hashlib.sha1(f"blob {st.st_size}\0".encode())
        sha256 = hashlib.sha256()
        with data.open("rb") as f:
            while block := f.read(1 << 20):
                sha1.update(block)
                sha256.update(block)
        cached = (sha1.hexdigest(), sha256.hexdigest())
        with _HASH_LOCK:
            _HASH_CACHE[key] = cached
    return cached[0], cached[1], st.st_size


@dataclass(frozen=True)
class HubFile:
    """One file as the server serves it (``oid`` is the tree entry's git blob id)."""

    path: str
    size: int
    oid: str
    sha256: str
    lfs: bool
    pointer_size: int | None
    data: bytes | Path = field(repr=False)

    def read(self) -> bytes:
        """The content."""
        return self.data if isinstance(self.data, bytes) else self.data.read_bytes()

    @property
    def etag(self) -> str:
        """The ETag ``resolve`` sends (quoted)."""
        return f'"{self.sha256 if self.lfs else self.oid}"'


def _make_file(path: str, data: bytes | Path, lfs_threshold: int) -> HubFile:
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, (bytes, Path)):
        raise TypeError(f"{path}: content must be bytes or Path, not {type(data).__name__}")
    if isinstance(data, Path) and not data.is_file():
        raise FileNotFoundError(data)
    blob_sha1, sha256, size = _digests(data)
    lfs = size >= lfs_threshold or Path(path).suffix.lower() in LFS_EXTENSIONS
    pointer = lfs_pointer(sha256, size) if lfs else None
    return HubFile(
        path=path,
        size=size,
        oid=_git_sha1("blob", pointer) if pointer is not None else blob_sha1,
        sha256=sha256,
        lfs=lfs,
        pointer_size=len(pointer) if pointer is not None else None,
        data=data,
    )


def _tree_oids(files: Mapping[str, HubFile]) -> dict[str, str]:
    """Git tree ids of every directory ("" is the root); ValueError if a path is both a file
    and a directory."""
    root: dict[str, Any] = {}
    for path, f in files.items():
        node = root
        *dirs, name = path.split("/")
        for d in dirs:
            node = node.setdefault(d, {})
            if not isinstance(node, dict):
                raise ValueError(f"{path}: a parent is a file")
        if name in node:
            raise ValueError(f"{path} is a directory")
        node[name] = f.oid
    oids: dict[str, str] = {}

    def walk(node: dict[str, Any], directory: str) -> str:
        entries = []
        for name, child in node.items():
            if isinstance(child, dict):
                sub = f"{directory}/{name}" if directory else name
                entries.append((name + "/", b"40000 ", name, walk(child, sub)))
            else:
                entries.append((name, b"100644 ", name, child))
        body = b"".join(
            mode + name.encode() + b"\0" + bytes.fromhex(oid)
            for _, mode, name, oid in sorted(entries)
        )
        oids[directory] = _git_sha1("tree", body)
        return oids[directory]

    walk(root, "")
    return oids


@dataclass(frozen=True)
class _Commit:
    sha: str
    parent: str | None
    files: dict[str, HubFile]  # sorted by path
    trees: dict[str, str]  # directory -> tree oid
    title: str
    date: datetime


def _make_commit(
    files: dict[str, HubFile], parent: _Commit | None, generation: int, title: str
) -> _Commit:
    files = dict(sorted(files.items()))
    trees = _tree_oids(files)
    ts = _EPOCH + 60 * generation
    body = f"tree {trees['']}\n"
    if parent is not None:
        body += f"parent {parent.sha}\n"
    body += f"author {_AUTHOR} {ts} +0000\ncommitter {_AUTHOR} {ts} +0000\n\n{title}\n"
    return _Commit(
        sha=_git_sha1("commit", body.encode()),
        parent=parent.sha if parent is not None else None,
        files=files,
        trees=trees,
        title=title,
        date=datetime.fromtimestamp(ts, tz=timezone.utc),
    )


@dataclass
class _Repo:
    repo_id: str
    private: bool
    gated: bool
    token: str | None
    lfs_threshold: int
    info: dict[str, Any]
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> _Commit | None:
        """A branch, then a tag, then a full commit sha."""
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and _SHA_RE.fullmatch(revision):
            sha = revision
        return self.commits.get(sha) if sha is not None else None


def _iso(date: datetime) -> str:
    return date.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _collect(files: Mapping[str, bytes | Path | None] | Path) -> dict[str, bytes | Path | None]:
    if isinstance(files, Path):
        if not files.is_dir():
            raise NotADirectoryError(files)
        return {p.relative_to(files).as_posix(): p for p in sorted(files.rglob("*")) if p.is_file()}
    out: dict[str, bytes | Path | None] = {}
    for path, data in files.items():
        clean = path.strip("/")
        if not clean or any(part in ("", ".", "..") for part in clean.split("/")):
            raise ValueError(f"bad repo path {path!r}")
        out[clean] = data
    return out


# --------------------------------------------------------------------------- HTTP


class _Answer(Exception):
    """Raised by routing code to answer with an error."""

    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.headers = code, message, headers or {}


def _error(code: int, error_code: str | None, message: str, **extra: str) -> _Answer:
    headers = {"X-Error-Message": message.encode("ascii", "replace").decode(), **extra}
    if error_code is not None:
        headers["X-Error-Code"] = error_code
    return _Answer(code, message, headers)


def _flag(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "yes")


class _HubHandler(_Handler):
    server_version = "hubserver/1"
    _body_bytes = b""  # the body of the current POST

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._body_bytes = self.rfile.read(length) if length > 0 else b""
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        record = self._record()
        try:
            try:
                self._route(record, head)
            except _Answer as answer:
                self._json(record, answer.code, {"error": answer.message}, answer.headers)
        except (OSError, _Stopped):
            self.close_connection = True

    # -- routing

    @property
    def hub(self) -> HubServer:
        return self.server.owner.hub  # type: ignore[attr-defined,no-any-return]

    def _route(self, record: RequestRecord, head: bool) -> None:
        segments = [unquote(s) for s in urlsplit(self.path).path.split("/")[1:]]
        if segments[:2] == ["api", "models"] and len(segments) > 2:
            self._api(record, segments[2:])
            return
        if self.command == "POST":
            raise _error(405, None, "method not allowed")
        if (
            len(segments) >= 5
            and segments[2] == "resolve"
            and (segments[1] != "resolve" or self.hub._has("/".join(segments[:2])))
        ):
            n = 2
        elif len(segments) >= 4 and segments[1] == "resolve":
            n = 1
        else:
            raise _error(404, None, "not found")
        repo = self._repo("/".join(segments[:n]))
        self._resolve(record, head, repo, segments[n + 1], "/".join(segments[n + 2 :]))

    def _repo(self, repo_id: str) -> _Repo:
        repo = self.hub._get(repo_id)
        if repo is None:
            raise _error(404, "RepoNotFound", "Repository not found")
        if repo.private:
            auth = self.headers.get("Authorization")
            if not auth:
                code = "GatedRepo" if repo.gated else "RepoNotFound"
                message = (
                    f"Access to model {repo_id} is restricted. You must have access to it "
                    "and be authenticated to access it. Please log in."
                    if repo.gated
                    else "Repository not found"
                )
                raise _error(401, code, message)
            if auth != f"Bearer {repo.token}":
                raise _error(403, None, "Invalid credentials in Authorization header")
        return repo

    def _commit(self, repo: _Repo, revision: str) -> _Commit:
        with self.hub._lock:
            commit = repo.resolve(revision)
        if commit is None:
            raise _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _api(self, record: RequestRecord, rest: list[str]) -> None:
        override = self.hub._api_answer(["/".join(rest[:2]), rest[0]])
        if override is not None:
            code, headers = override
            self._json(record, code, {"error": f"answer_api: {code}"}, headers)
            return
        if len(rest) >= 2 and self.hub._has("/".join(rest[:2])):
            repo_id, tail = "/".join(rest[:2]), rest[2:]
        elif self.hub._has(rest[0]):
            repo_id, tail = rest[0], rest[1:]
        else:
            repo_id, tail = "/".join(rest[:2]), rest[2:]
        repo = self._repo(repo_id)
        query = parse_qs(record.query, keep_blank_values=True)
        post = self.command == "POST"
        if not tail and not post:
            self._json(record, 200, self.hub._info(repo, self._commit(repo, "main"), query))
        elif len(tail) == 2 and tail[0] == "revision" and not post:
            self._json(record, 200, self.hub._info(repo, self._commit(repo, tail[1]), query))
        elif len(tail) >= 2 and tail[0] == "tree" and not post:
            self._tree(record, repo, tail[1], "/".join(tail[2:]).strip("/"), query)
        elif tail == ["refs"] and not post:
            self._json(record, 200, self.hub._refs(repo))
        elif len(tail) == 2 and tail[0] == "commits" and not post:
            items = self.hub._history(repo, self._commit(repo, tail[1]))
            self._paged(record, items, query)
        elif len(tail) == 2 and tail[0] == "paths-info" and post:
            commit = self._commit(repo, tail[1])
            form = self._form()
            entries = self.hub._paths_info(repo, commit, form.get("paths", []), form)
            self._json(record, 200, entries)
        else:
            raise _error(404, None, "not found")

    def _form(self) -> dict[str, list[str]]:
        body = self._body_bytes
        if "json" in (self.headers.get("Content-Type") or ""):
            data = json.loads(body or b"{}")
            return {
                k: [str(x) for x in v] if isinstance(v, list) else [str(v)] for k, v in data.items()
            }
        return parse_qs(body.decode(), keep_blank_values=True)

    def _tree(
        self,
        record: RequestRecord,
        repo: _Repo,
        revision: str,
        path: str,
        query: dict[str, list[str]],
    ) -> None:
        commit = self._commit(repo, revision)
        if path and path not in commit.trees:
            raise _error(
                404,
                "EntryNotFound",
                f"{path} does not exist on {revision}",
                **{"X-Repo-Commit": commit.sha},
            )
        recursive = _flag((query.get("recursive") or [None])[0])
        expand = _flag((query.get("expand") or [None])[0])
        entries = self.hub._tree_entries(repo, commit, path, recursive, expand)
        self._paged(record, entries, query, {"X-Repo-Commit": commit.sha})

    def _paged(
        self,
        record: RequestRecord,
        items: list[dict[str, Any]],
        query: dict[str, list[str]],
        headers: dict[str, str] | None = None,
    ) -> None:
        start = int((query.get("cursor") or ["0"])[0] or 0)
        size = self.hub.page_size
        page = items[start : start + size]
        headers = dict(headers or {})
        if start + size < len(items):
            params = [(k, v) for k, vs in query.items() if k != "cursor" for v in vs]
            params.append(("cursor", str(start + size)))
            qs = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params)
            url = self.hub.base_url + urlsplit(self.path).path + "?" + qs
            headers["Link"] = f'<{url}>; rel="next"'
        self._json(record, 200, page, headers)

    def _json(
        self, record: RequestRecord, code: int, obj: Any, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(obj).encode()
        self._simple(
            record,
            code,
            body,
            {"Content-Type": "application/json; charset=utf-8", **(headers or {})},
        )

    # -- files

    def _resolve(
        self, record: RequestRecord, head: bool, repo: _Repo, revision: str, path: str
    ) -> None:
        if self.command not in ("GET", "HEAD"):
            raise _error(405, None, "method not allowed")
        commit = self._commit(repo, revision)
        entry = commit.files.get(path)
        missing = {"X-Repo-Commit": commit.sha}
        if entry is None:
            raise _error(404, "EntryNotFound", f"{path} does not exist on {revision}", **missing)
        owner = self.server.owner
        version = self.hub._version(entry)
        plan = _Plan(version, rate=owner.rate_bytes_per_s)
        if not head:
            faulted, fault_plan = owner._plan(_fault_key(repo.repo_id, path), False)
            if faulted is not None:
                plan = replace(fault_plan, version=version)
            record.faults = plan.names
        if isinstance(plan.outcome, Status):
            extra = {"X-Repo-Commit": commit.sha}
            if plan.outcome.code == 404:
                extra.update({"X-Error-Code": "EntryNotFound", "X-Error-Message": "injected"})
            self._status_fault(record, plan.outcome, extra)
            return
        cdn = self.hub._cdn
        if entry.lfs and cdn is not None:
            headers = {
                "Location": f"{cdn}/{entry.sha256}",
                "X-Linked-Size": str(entry.size),
                "X-Linked-Etag": f'"{entry.sha256}"',
                "X-Repo-Commit": commit.sha,
                "ETag": f'"{entry.sha256}"',
                "Content-Type": "text/plain; charset=utf-8",
            }
            self._simple(record, 302, b"", headers)
            return
        self._content(record, plan, head, self.headers.get("Range"), {"X-Repo-Commit": commit.sha})


def _fault_key(repo_id: str, path: str) -> str:
    return f"/{repo_id}/{path}"


class _HubEngine(FileServer):
    """The FileServer underneath: its handler routes Hub URLs, its log and faults are reused."""

    _handler_class = _HubHandler

    def __init__(self, hub: HubServer, rate_bytes_per_s: int | None) -> None:
        super().__init__(rate_bytes_per_s)
        self.hub = hub


# --------------------------------------------------------------------------- public server


class HubServer:
    """Context manager; a Hub-compatible server on 127.0.0.1 (free port, daemon threads).

    ``page_size`` caps the entries of one tree/commits page (the real Hub: 1000);
    ``rate_bytes_per_s`` throttles every file body, as in ``FileServer``.
    """

    def __init__(self, *, page_size: int = _DEFAULT_PAGE, rate_bytes_per_s: int | None = None):
        if page_size < 1:
            raise ValueError("page_size must be positive")
        self.page_size = page_size
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._versions: dict[tuple[str, str], _Version] = {}
        self._cdn: str | None = None
        self._api_answers: dict[str, tuple[int, dict[str, str]]] = {}
        self._extra_entries: dict[str, list[dict[str, Any]]] = {}
        self._engine = _HubEngine(self, rate_bytes_per_s)

    # -- lifecycle

    def start(self) -> HubServer:
        """Bind and serve (``with`` does this)."""
        self._engine.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut open connections."""
        self._engine.stop()

    def __enter__(self) -> HubServer:
        if self._engine._httpd is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host_port(self) -> str:
        """``"127.0.0.1:PORT"``."""
        return self._engine.host_port

    @property
    def base_url(self) -> str:
        """``"http://127.0.0.1:PORT"`` (what ``HF_ENDPOINT`` should be)."""
        return self._engine.base_url

    def url(self, repo_id: str, path: str, revision: str = "main") -> str:
        """The ``resolve`` URL of a file."""
        return f"{self.base_url}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"

    # -- repositories

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | Path] | Path,
        *,
        private: bool = False,
        token: str | None = None,
        lfs_threshold: int = 1_000_000,
        gated: bool = False,
        info: Mapping[str, Any] | None = None,
    ) -> str:
        """Create ``repo_id`` with branch ``main`` holding one commit of ``files`` (a mapping
        of repo path to content, or a directory whose files are all taken); returns the sha.

        ``private``: requests need ``Authorization: Bearer <token>`` (401 without, 403 with a
        wrong one); ``gated`` makes that 401 say ``GatedRepo``. ``info`` adds fields to the
        model-info JSON (``pipeline_tag``, ``tags``, ``library_name`` ...).
        """
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
            raise ValueError(f"bad repo id {repo_id!r}")
        if private and not token:
            raise ValueError("a private repo needs a token")
        contents = _collect(files)
        made = {p: _make_file(p, d, lfs_threshold) for p, d in contents.items() if d is not None}
        commit = _make_commit(made, None, 0, f"Upload {repo_id}")
        repo = _Repo(
            repo_id=repo_id,
            private=private or gated,
            gated=gated,
            token=token,
            lfs_threshold=lfs_threshold,
            info=dict(info or {}),
        )
        repo.commits[commit.sha] = commit
        repo.branches["main"] = commit.sha
        with self._lock:
            if repo_id in self._repos:
                raise ValueError(f"{repo_id} exists")
            self._repos[repo_id] = repo
        return commit.sha

    def push(
        self, repo_id: str, changes: Mapping[str, bytes | Path | None], branch: str = "main"
    ) -> str:
        """Commit ``changes`` (``None`` deletes a path) on ``branch`` (created from ``main``
        if new); returns the new sha. Earlier commits stay resolvable by sha."""
        repo = self._repo(repo_id)
        contents = _collect(changes)
        made = {
            p: _make_file(p, d, repo.lfs_threshold) for p, d in contents.items() if d is not None
        }
        with self._lock:
            parent = repo.commits[repo.branches.get(branch, repo.branches["main"])]
            files = dict(parent.files)
            for path, data in contents.items():
                if data is None:
                    if path not in files:
                        raise KeyError(f"{repo_id}: no {path} to delete")
                    del files[path]
                else:
                    files[path] = made[path]
            title = f"Update {', '.join(sorted(contents))}"
            commit = _make_commit(files, parent, len(repo.commits), title[:200])
            repo.commits[commit.sha] = commit
            repo.branches[branch] = commit.sha
        return commit.sha

    def add_tag(self, repo_id: str, tag: str, sha: str) -> None:
        """Point tag ``tag`` at ``sha`` (or at what a branch/tag name resolves to)."""
        repo = self._repo(repo_id)
        target = self.commit_of(repo_id, sha)
        with self._lock:
            repo.tags[tag] = target

    def commit_of(self, repo_id: str, revision: str = "main") -> str:
        """The 40-hex sha ``revision`` resolves to (KeyError if none)."""
        repo = self._repo(repo_id)
        with self._lock:
            commit = repo.resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id}: no revision {revision!r}")
        return commit.sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, HubFile]:
        """Every file of a revision, by path."""
        repo = self._repo(repo_id)
        with self._lock:
            commit = repo.resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id}: no revision {revision!r}")
        return dict(commit.files)

    def file(self, repo_id: str, path: str, revision: str = "main") -> HubFile:
        """One file of a revision (KeyError if absent)."""
        return self.files(repo_id, revision)[path]

    def set_faults(self, repo_id: str, path: str, faults: list[Fault]) -> None:
        """Arm ``faults`` (fresh counts) for GET ``resolve`` of ``path`` in any revision."""
        self._repo(repo_id)
        if any(isinstance(f, ChangeAfterFirst) for f in faults):
            raise ValueError("ChangeAfterFirst does not apply to a Hub file: use push()")
        key = _fault_key(repo_id, path)
        with self._engine._lock:
            self._engine._entries.setdefault(key, _Entry())  # an entry that only holds faults
        self._engine.set_faults(key, faults)

    def add_listing_entries(self, repo_id: str, entries: list[dict[str, Any]]) -> None:
        """Append raw entries (``{"type": "file", "path": ..., "size": ..., "oid": ...}``) to
        ``repo_id``'s recursive tree listing, whatever the revision, as a broken or hostile
        Hub could send them: duplicates, a file that is also a directory. They are listed
        only; their ``resolve`` URLs answer 404."""
        with self._lock:
            self._extra_entries.setdefault(repo_id, []).extend(dict(e) for e in entries)

    def redirect_lfs_to(self, base_url: str | None) -> None:
        """Answer ``resolve`` of LFS files with 302 to ``{base_url}/{sha256}`` (None: serve
        them directly again)."""
        self._cdn = base_url.rstrip("/") if base_url else None

    def answer_api(
        self, repo_id: str, code: int | None, headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer every API request about ``repo_id`` with ``code`` and ``headers`` (None:
        answer normally again). The repo need not exist."""
        with self._lock:
            if code is None:
                self._api_answers.pop(repo_id, None)
            else:
                self._api_answers[repo_id] = (code, dict(headers or {}))

    def export_blobs(self, directory: Path) -> list[Path]:
        """Write every LFS blob of every repo and commit as ``directory/<sha256>``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        blobs: dict[str, HubFile] = {}
        with self._lock:
            for repo in self._repos.values():
                for commit in repo.commits.values():
                    blobs.update({f.sha256: f for f in commit.files.values() if f.lfs})
        written = []
        for sha, f in sorted(blobs.items()):
            target = directory / sha
            if isinstance(f.data, Path):
                shutil.copyfile(f.data, target)
            else:
                target.write_bytes(f.data)
            written.append(target)
        return written

    # -- request log

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the request log, oldest first."""
        return self._engine.requests

    def count(self, method: str | None = None, path_contains: str | None = None) -> int:
        """Logged requests with ``method`` whose decoded path contains ``path_contains``."""
        return sum(1 for r in self.requests if _matches(r, method, path_contains))

    def bytes_sent(self, path_contains: str | None = None) -> int:
        """Body bytes sent for requests whose decoded path contains ``path_contains``."""
        return sum(r.body_bytes_sent for r in self.requests if _matches(r, None, path_contains))

    def reset_log(self) -> None:
        """Forget all logged requests."""
        self._engine.reset_log()

    # -- internals (the handler's)

    def _api_answer(self, candidates: list[str]) -> tuple[int, dict[str, str]] | None:
        with self._lock:
            return next((self._api_answers[c] for c in candidates if c in self._api_answers), None)

    def _has(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._repos

    def _get(self, repo_id: str) -> _Repo | None:
        with self._lock:
            return self._repos.get(repo_id)

    def _repo(self, repo_id: str) -> _Repo:
        repo = self._get(repo_id)
        if repo is None:
            raise KeyError(f"no repo {repo_id}")
        return repo

    def _version(self, f: HubFile) -> _Version:
        """The fileserver version serving ``f`` (built once per distinct content and etag)."""
        key = (f.sha256, f.etag)
        with self._lock:
            version = self._versions.get(key)
            if version is None:
                data, path = (f.data, None) if isinstance(f.data, bytes) else (None, f.data)
                version = _Version(
                    data=data,
                    path=path,
                    size=f.size,
                    etag=f.etag,
                    mtime=_EPOCH,
                    last_modified=email.utils.formatdate(_EPOCH, usegmt=True),
                )
                self._versions[key] = version
        return version

    def _info(self, repo: _Repo, commit: _Commit, query: dict[str, list[str]]) -> dict[str, Any]:
        blobs = _flag((query.get("blobs") or [None])[0])
        siblings = []
        for f in commit.files.values():
            sibling: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                sibling.update({"size": f.size, "blobId": f.oid})
                if f.lfs:
                    sibling["lfs"] = {
                        "sha256": f.sha256,
                        "size": f.size,
                        "pointerSize": f.pointer_size,
                    }
            siblings.append(sibling)
        with self._lock:
            first = min(c.date for c in repo.commits.values())
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.sha,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(first),
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": "transformers",
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(f.size for f in commit.files.values()),
        }
        config = _config_summary(commit.files.get("config.json"))
        if config:
            info["config"] = config
        if _flag((query.get("securityStatus") or [None])[0]):
            info["securityRepoStatus"] = {"scansDone": True, "filesWithIssues": []}
        info.update(repo.info)
        return info

    def _last_change(self, repo: _Repo, commit: _Commit, path: str, is_dir: bool) -> _Commit:
        """The oldest ancestor since which ``path`` has had its current id."""

        def oid(c: _Commit) -> str | None:
            if is_dir:
                return c.trees.get(path)
            f = c.files.get(path)
            return f.oid if f is not None else None

        current, want = commit, oid(commit)
        with self._lock:
            while current.parent is not None:
                parent = repo.commits[current.parent]
                if oid(parent) != want:
                    break
                current = parent
        return current

    def _entry(
        self, repo: _Repo, commit: _Commit, path: str, expand: bool
    ) -> dict[str, Any] | None:
        f = commit.files.get(path)
        if f is not None:
            entry: dict[str, Any] = {"type": "file", "oid": f.oid, "size": f.size, "path": path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
        elif path in commit.trees and path:
            entry = {"type": "directory", "oid": commit.trees[path], "size": 0, "path": path}
        else:
            return None
        if expand:
            last = self._last_change(repo, commit, path, f is None)
            entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": _iso(last.date)}
            if f is not None:
                entry["securityFileStatus"] = {
                    "status": "safe",
                    "avScan": {"virusFound": False, "virusNames": None},
                    "pickleImportScan": None,
                }
        return entry

    def _tree_entries(
        self, repo: _Repo, commit: _Commit, path: str, recursive: bool, expand: bool
    ) -> list[dict[str, Any]]:
        prefix = path + "/" if path else ""
        names = [*commit.files, *(d for d in commit.trees if d)]
        chosen = sorted(
            n for n in names if n.startswith(prefix) and (recursive or "/" not in n[len(prefix) :])
        )
        listed = [e for n in chosen if (e := self._entry(repo, commit, n, expand)) is not None]
        if recursive and not path:
            with self._lock:
                listed += [dict(e) for e in self._extra_entries.get(repo.repo_id, [])]
        return listed

    def _paths_info(
        self, repo: _Repo, commit: _Commit, paths: Iterable[str], form: dict[str, list[str]]
    ) -> list[dict[str, Any]]:
        expand = _flag((form.get("expand") or [None])[0])
        out = []
        for path in paths:
            entry = self._entry(repo, commit, path.strip("/"), expand)
            if entry is not None:
                out.append(entry)
        return out

    def _refs(self, repo: _Repo) -> dict[str, Any]:
        with self._lock:
            branches, tags = dict(repo.branches), dict(repo.tags)
        return {
            "branches": [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                for n, s in sorted(branches.items())
            ],
            "tags": [
                {"name": n, "ref": f"refs/tags/{n}", "targetCommit": s}
                for n, s in sorted(tags.items())
            ],
            "converts": [],
            "pullRequests": [],
        }

    def _history(self, repo: _Repo, commit: _Commit) -> list[dict[str, Any]]:
        items = []
        current: _Commit | None = commit
        with self._lock:
            while current is not None:
                items.append(
                    {
                        "id": current.sha,
                        "title": current.title,
                        "message": "",
                        "authors": [{"user": "modelhost-tests"}],
                        "date": _iso(current.date),
                    }
                )
                current = repo.commits[current.parent] if current.parent else None
        return items


def _config_summary(f: HubFile | None) -> dict[str, Any]:
    """``architectures`` and ``model_type`` of a config.json, as the Hub's model info shows."""
    if f is None or f.size > 1_000_000:
        return {}
    try:
        config = json.loads(f.read())
    except (ValueError, OSError):
        return {}
    if not isinstance(config, dict):
        return {}
    return {k: config[k] for k in ("architectures", "model_type") if k in config}


def _matches(record: RequestRecord, method: str | None, path_contains: str | None) -> bool:
    return (method is None or record.method == method.upper()) and (
        path_contains is None or path_contains in record.path
    )
