"""The Hub's read protocol, decided without I/O: what each ``/hf`` request means and answers.

Everything here is a pure function of installed manifests and the request: which installed
revision a name means, a repository's tree (its git ids included), pages, ``paths-info``,
model info, the headers of a ``resolve`` answer, byte ranges, and the typed errors that
carry the Hub's ``X-Error-Code``. ``api/hf.py`` reads the store (through ``index.py``) and
sends files; ``api/errors.py`` writes every error in the Hub's shape with ``hub_error``.

What a repository is here: the files a ``huggingface`` install recorded, at the commit it
pinned (``Manifest.revision``), under the repo id it came from (``Manifest.model_id``); a
component installed with it (a TTS vocoder in ``vocoder/``) is its own repository at its own
commit. ``.gitattributes`` is never installed, so never served.

Which files are LFS: exactly those whose manifest entry has no ``git_sha1``. The Hub source
records the git blob id of a file only when the Hub's tree listing did not mark it ``lfs``
(``sources/huggingface.py: _specs``; the offline cache import keeps the same rule, from the
name of the cached blob), and has since the source's first version, so every ``huggingface``
manifest says it; a file converted at install (a pickle made safetensors) has none either and
is served as an LFS file, which only needs its sha256 and size.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import mimetypes
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Literal
from urllib.parse import unquote

from modelhost.errors import InvalidRequest, ModelhostError
from modelhost.store.manifest import Manifest

PREFIX = "/hf"
SOURCE = "huggingface"  # only this source's installs are Hub repositories
DEFAULT_REVISION = "main"
# Entries per tree page (the real Hub's is 1000). Read at each request, so a test may lower it.
TREE_PAGE_SIZE = 1000
COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = ("1", "true", "yes")

Kind = Literal["info", "tree", "paths-info", "resolve", "other"]


# --------------------------------------------------------------------------- errors


class HubError(ModelhostError):
    """An error the Hub answers with a code its clients map to their own exceptions
    (``X-Error-Code``; ``huggingface_hub``'s ``hf_raise_for_status``), plus headers."""

    hub_code: str | None = None

    def __init__(
        self, message: str, *, error: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, error=error)
        self.headers = dict(headers or {})


class RepoNotFound(HubError):
    status_code = 404
    error = "Repository not found"
    hub_code = "RepoNotFound"  # RepositoryNotFoundError


class RevisionNotFound(HubError):
    status_code = 404
    error = "Revision not found"
    hub_code = "RevisionNotFound"  # RevisionNotFoundError


class EntryNotFound(HubError):
    """A path the revision does not hold; ``X-Repo-Commit`` lets a client cache that."""

    status_code = 404
    error = "Entry not found"
    hub_code = "EntryNotFound"  # RemoteEntryNotFoundError (an EntryNotFoundError)

    def __init__(self, message: str, commit: str) -> None:
        super().__init__(message, headers={"X-Repo-Commit": commit})


class MirrorOff(HubError):
    """``MODELHOST_MIRROR=off``. Answered as RepoNotFound, so that clients raise their
    repository error with this message in it, instead of retrying or blaming the network."""

    status_code = 404
    error = "Mirror off"
    hub_code = "RepoNotFound"


class PullNotBuilt(HubError):
    """``MODELHOST_MIRROR=pull`` asked for what is not installed."""

    status_code = 501
    error = "Pull-through not built"


class NotMirrored(HubError):
    """A path under /hf that is no part of the Hub's read protocol this mirror serves."""

    status_code = 404
    error = "Not found"


class RangeNotSatisfiable(HubError):
    status_code = 416
    error = "Range not satisfiable"

    def __init__(self, size: int) -> None:
        super().__init__(
            f"The range asked for starts past the end of the file ({size} bytes)",
            headers={"Content-Range": f"bytes */{size}"},
        )


def is_mirror_path(path: str) -> bool:
    """Whether a request path is the mirror's (its errors take the Hub's shape)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def _header_text(text: str) -> str:
    """``text`` as one header line: latin-1 only (what HTTP headers carry), no line breaks."""
    line = " ".join(text.split())
    return line.encode("latin-1", "replace").decode("latin-1")


def hub_error(
    status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
) -> tuple[dict, dict[str, str]]:
    """The body and headers of an error answer, as the Hub writes them: ``{"error": ...}``,
    ``X-Error-Message``, and ``X-Error-Code`` when the error has one. The one place errors
    take the Hub's shape (``api/errors.py`` calls it for every error under /hf)."""
    out = {"X-Error-Message": _header_text(message), **(headers or {})}
    if code is not None:
        out["X-Error-Code"] = code
    if status == 401:
        out.setdefault("WWW-Authenticate", "Bearer")
    return {"error": message}, out


# --------------------------------------------------------------------------- git ids


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The text git stores for an LFS file: its git blob id is the tree entry's ``oid``."""
    text = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
    return text.encode()


def git_id(kind: str, body: bytes) -> str:
    """The id git gives an object (``blob``, ``tree``) of this content."""
    return hashlib.sha1(b"%s %d\0" % (kind.encode(), len(body)) + body).hexdigest()


def tree_ids(files: Mapping[str, str]) -> dict[str, str]:
    """The git tree id of every directory ("" is the root) of ``{path: blob id}`` (all files
    mode 100644): the ids git would give a tree of exactly these files."""
    root: dict = {}
    for path, oid in files.items():
        node = root
        *folders, name = path.split("/")
        for folder in folders:
            node = node.setdefault(folder, {})
        node[name] = oid
    ids: dict[str, str] = {}

    def walk(node: dict, directory: str) -> str:
        entries = []
        for name, child in node.items():
            if isinstance(child, dict):
                sub = f"{directory}/{name}" if directory else name
                # git orders a directory as if its name ended in "/".
                entries.append((name + "/", b"40000 " + name.encode(), walk(child, sub)))
            else:
                entries.append((name, b"100644 " + name.encode(), child))
        body = b"".join(mode + b"\0" + bytes.fromhex(oid) for _, mode, oid in sorted(entries))
        ids[directory] = git_id("tree", body)
        return ids[directory]

    walk(root, "")
    return ids


# --------------------------------------------------------------------------- repositories


@dataclass(frozen=True)
class MirrorFile:
    """One installed file as the Hub describes it."""

    path: str
    size: int
    sha256: str  # of the content; the blob's name in the store
    git_sha1: str | None  # recorded at install for files outside LFS

    @property
    def lfs(self) -> bool:
        return self.git_sha1 is None

    @cached_property
    def pointer(self) -> bytes | None:
        return lfs_pointer(self.sha256, self.size) if self.lfs else None

    @cached_property
    def oid(self) -> str:
        """The git blob id in a tree listing: of the LFS pointer text for LFS files."""
        return git_id("blob", self.pointer) if self.pointer is not None else str(self.git_sha1)

    @property
    def etag(self) -> str:
        """What ``resolve`` sends as ETag: the sha256 for LFS files, else the git blob id."""
        return f'"{self.sha256 if self.lfs else self.git_sha1}"'

    def entry(self) -> dict:
        """The tree / paths-info entry."""
        out: dict = {"type": "file", "oid": self.oid, "size": self.size, "path": self.path}
        if self.pointer is not None:
            out["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(self.pointer)}
        return out


@dataclass(frozen=True)
class RepoRevision:
    """One repository at one installed commit: what the mirror serves for it."""

    repo_id: str
    commit: str
    files: Mapping[str, MirrorFile]
    # Revisions the installs asked for (branch, tag or commit); the commit always resolves.
    names: frozenset[str] = frozenset()
    converted: Mapping[str, str] = field(default_factory=dict)  # pickle path -> its safetensors
    installed_at: datetime | None = None

    @cached_property
    def trees(self) -> dict[str, str]:
        return tree_ids({path: f.oid for path, f in self.files.items()})

    def entry(self, path: str) -> dict | None:
        """The tree entry of a file or directory, or None."""
        found = self.files.get(path)
        if found is not None:
            return found.entry()
        if path and path in self.trees:
            return {"type": "directory", "oid": self.trees[path], "size": 0, "path": path}
        return None


def _requested(manifest: Manifest) -> str | None:
    """The revision the install asked for (the spec's, or the recorded request's)."""
    options = manifest.spec.options
    return manifest.spec.requested_revision or (options.revision if options else None)


def revisions_of(manifest: Manifest) -> list[RepoRevision]:
    """The repositories a ``huggingface`` install holds: the model's, then its components'
    (each in its folder); none for another source or a manifest without a commit."""
    if manifest.source != SOURCE or not manifest.revision:
        return []
    parts = [(manifest.model_id, manifest.revision, "", _requested(manifest) or DEFAULT_REVISION)]
    # Components are snapshotted at "main" (sources/huggingface.py).
    parts += [
        (c.repo_id, c.revision, c.path.strip("/") + "/", DEFAULT_REVISION)
        for c in manifest.spec.components
        if c.revision
    ]
    folders = [prefix for _, _, prefix, _ in parts if prefix]
    when = manifest.downloaded_at
    if when is not None and when.tzinfo is None:  # comparable with the others (UTC)
        when = when.replace(tzinfo=timezone.utc)
    out = []
    for repo_id, commit, prefix, requested in parts:

        def mine(path: str, prefix: str = prefix) -> bool:
            if prefix:
                return path.startswith(prefix)
            return not any(path.startswith(folder) for folder in folders)

        files = {
            f.path[len(prefix) :]: MirrorFile(f.path[len(prefix) :], f.size, f.sha256, f.git_sha1)
            for f in manifest.files
            if mine(f.path)
        }
        converted = {
            c.original_path[len(prefix) :]: c.converted_path[len(prefix) :]
            for c in manifest.conversions
            if mine(c.original_path)
        }
        out.append(RepoRevision(repo_id, commit, files, frozenset({requested}), converted, when))
    return out


def by_repo(manifests: Iterable[Manifest]) -> dict[str, list[RepoRevision]]:
    """Every installed repository by id, one ``RepoRevision`` per commit: installs of the
    same commit (under two names, with other patterns) are one tree, their files together."""
    merged: dict[tuple[str, str], RepoRevision] = {}
    for manifest in manifests:
        for revision in revisions_of(manifest):
            key = (revision.repo_id, revision.commit)
            seen = merged.get(key)
            if seen is not None:
                later = max(
                    (t for t in (seen.installed_at, revision.installed_at) if t), default=None
                )
                revision = RepoRevision(
                    revision.repo_id,
                    revision.commit,
                    {**revision.files, **seen.files},
                    seen.names | revision.names,
                    {**revision.converted, **seen.converted},
                    later,
                )
            merged[key] = revision
    out: dict[str, list[RepoRevision]] = {}
    for (repo_id, _), revision in merged.items():
        out.setdefault(repo_id, []).append(revision)
    return out


def _newest(revisions: list[RepoRevision]) -> RepoRevision:
    return max(revisions, key=lambda r: (r.installed_at is not None, r.installed_at or 0, r.commit))


def pick_revision(repo_id: str, revisions: list[RepoRevision], name: str) -> RepoRevision:
    """The installed revision ``name`` means: the commit itself, else an install that asked
    for ``name`` (the newest, if several did), else for ``main`` the newest install, since
    what is installed is this mirror's ``main``. ``RevisionNotFound`` otherwise."""
    exact = [r for r in revisions if r.commit == name]
    if exact:
        return exact[0]
    named = [r for r in revisions if name in r.names]
    if named:
        return _newest(named)
    if name == DEFAULT_REVISION and revisions:
        return _newest(revisions)
    known = {n for r in revisions for n in r.names} | {r.commit for r in revisions}
    installed = ", ".join(sorted(known))
    raise RevisionNotFound(
        f"Revision {name!r} of {repo_id} is not installed in this modelhost (installed: "
        f"{installed}; 'main' means the newest install)",
    )


def lookup(
    installed: Mapping[str, list[RepoRevision]], readings: list[tuple[str, str]], mode: str
) -> tuple[int, RepoRevision]:
    """The revision a request is for, and which of its ``readings`` (repo id, revision: an
    ambiguous path reads more than one way, most likely first) found it: the first whose
    repository is installed. With ``mode`` ``pull``, what is not installed is refused as not
    built (501) rather than not found."""
    for number, (repo_id, revision) in enumerate(readings):
        if repo_id not in installed:
            continue
        try:
            return number, pick_revision(repo_id, installed[repo_id], revision)
        except RevisionNotFound as exc:
            if mode == "pull":
                raise _pull_not_built(f"{repo_id}@{revision}") from exc
            raise
    shown = readings[0][0] if readings else "?"
    if mode == "pull":
        raise _pull_not_built(shown)
    raise RepoNotFound(
        f"{shown} is not installed in this modelhost: install it first (modelhost pull "
        f"huggingface:{shown}), or ask for a model that is (GET /models/cache/info)",
    )


def _pull_not_built(what: str) -> PullNotBuilt:
    return PullNotBuilt(
        f"{what} is not installed, and pull-through (MODELHOST_MIRROR=pull) is not built yet: "
        "install it first (modelhost pull), or set MODELHOST_MIRROR=cache",
    )


def file_for(revision: RepoRevision, path: str) -> MirrorFile:
    """The installed file at ``path``; ``EntryNotFound`` (saying what a converted pickle
    became) otherwise."""
    found = revision.files.get(path)
    if found is not None:
        return found
    where = f"{revision.repo_id}@{revision.commit}"
    converted = revision.converted.get(path)
    if converted is not None:
        message = (
            f"{path} of {where} was a pickle, converted to safetensors at install: it is "
            f"served as {converted}, not under its pickled name"
        )
    else:
        message = f"{path} is not installed from {where}: the install did not choose it"
    raise EntryNotFound(message, revision.commit)


# --------------------------------------------------------------------------- answers


def model_info(revision: RepoRevision, blobs: bool) -> dict:
    """``/api/models/{repo}[/revision/{rev}]``: what Hub clients read of it (``id``, ``sha``,
    ``siblings``); ``blobs`` adds each sibling's size, blob id and LFS part."""
    siblings = []
    for path in sorted(revision.files):
        item: dict = {"rfilename": path}
        if blobs:
            f = revision.files[path]
            item.update({"size": f.size, "blobId": f.oid})
            if f.pointer is not None:
                item["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": len(f.pointer)}
        siblings.append(item)
    return {
        "id": revision.repo_id,
        "modelId": revision.repo_id,
        "sha": revision.commit,
        "private": False,
        "gated": False,
        "disabled": False,
        "siblings": siblings,
        "usedStorage": sum(f.size for f in revision.files.values()),
    }


def tree(revision: RepoRevision, path: str, recursive: bool) -> list[dict]:
    """The entries under ``path`` ("" the root), in path order: its children, or with
    ``recursive`` everything below; ``EntryNotFound`` if ``path`` is no directory."""
    path = path.strip("/")
    if path and path not in revision.trees:
        raise EntryNotFound(
            f"{path} is not a directory of {revision.repo_id}@{revision.commit}", revision.commit
        )
    prefix = f"{path}/" if path else ""
    names = [*revision.files, *(d for d in revision.trees if d)]
    chosen = sorted(
        n for n in names if n.startswith(prefix) and (recursive or "/" not in n[len(prefix) :])
    )
    return [entry for name in chosen if (entry := revision.entry(name)) is not None]


def encode_cursor(path: str) -> str:
    """A page's cursor: opaque to clients, the last path listed (listings are in path
    order, so the next page starts after it however the tree changed meanwhile)."""
    return base64.urlsafe_b64encode(path.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest(f"Invalid cursor {cursor!r}", error="Invalid cursor") from None


def page(entries: list[dict], cursor: str | None, size: int) -> tuple[list[dict], str | None]:
    """One page of a listing after ``cursor``, and the cursor of the next page (None: last)."""
    if cursor:
        after = decode_cursor(cursor)
        entries = [e for e in entries if e["path"] > after]
    items = entries[:size]
    more = len(entries) > size
    return items, encode_cursor(items[-1]["path"]) if more and items else None


def paths_info(revision: RepoRevision, paths: Iterable[str]) -> list[dict]:
    """``paths-info``: the entries of the paths that exist, in the order asked, once each."""
    out, seen = [], set()
    for path in paths:
        clean = path.strip("/")
        entry = revision.entry(clean) if clean not in seen else None
        seen.add(clean)
        if entry is not None:
            out.append(entry)
    return out


def flag(value: str | None) -> bool:
    """A query or form flag as the Hub reads it."""
    return value is not None and value.strip().lower() in _TRUE


def file_headers(revision: RepoRevision, f: MirrorFile) -> dict[str, str]:
    """The headers of a ``resolve`` answer (HEAD and GET), as the Hub sends them for a file
    it serves itself: the commit, the ETag (``X-Linked-*`` too, which clients read first),
    the size. Never Xet's headers."""
    return {
        "X-Repo-Commit": revision.commit,
        "ETag": f.etag,
        "X-Linked-Etag": f.etag,
        "X-Linked-Size": str(f.size),
        "Accept-Ranges": "bytes",
        "Content-Type": mimetypes.guess_type(f.path)[0] or "application/octet-stream",
    }


def byte_range(
    header: str | None, if_range: str | None, etag: str, size: int
) -> tuple[int, int] | None:
    """The one byte range ``[start, end)`` a ``Range`` header asks of a ``size``-byte file,
    or None to send the whole file: no header, an ``If-Range`` that is not this file's
    ETag, a header this does not read (another unit, bad syntax: RFC 9110 lets a server
    ignore it), or several ranges (clients of the Hub never ask for more than one).
    ``RangeNotSatisfiable`` when the range starts at or past the end."""
    if not header or (if_range is not None and if_range.strip() != etag):
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()):
        return None
    if not first:  # a suffix: the last N bytes
        if not last.isdigit():
            return None
        length = int(last)
        if length == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - length), size
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    start = int(first)
    end = int(last) + 1 if last else size
    if last and end <= start:
        return None  # first > last: not a valid range, so ignored
    if start >= size:
        raise RangeNotSatisfiable(size)
    return start, min(end, size)


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class ApiTarget:
    """An ``/api/models/...`` request read one way: its repo id, what it asks, of which
    revision (None: the default) and which path in the tree."""

    repo_id: str
    kind: Literal["info", "tree", "paths-info"]
    revision: str | None = None
    path: str = ""


@dataclass(frozen=True)
class ResolveTarget:
    repo_id: str
    revision: str
    path: str


def segments(raw_path: str) -> list[str]:
    """The segments of a raw (still percent-encoded) path after ``/hf``, each decoded: a
    revision like ``refs%2Fpr%2F1`` stays one segment, ``refs/pr/1``."""
    rest = raw_path[len(PREFIX) :] if is_mirror_path(raw_path) else raw_path
    return [unquote(part) for part in rest.strip("/").split("/")] if rest.strip("/") else []


def _api_tail(repo_id: str, tail: list[str], method: str) -> ApiTarget | None:
    if not tail:
        return ApiTarget(repo_id, "info") if method != "POST" else None
    head, rest = tail[0], tail[1:]
    if method == "POST":
        if head == "paths-info" and len(rest) == 1:
            return ApiTarget(repo_id, "paths-info", rest[0])
        return None
    if head == "revision" and len(rest) == 1:
        return ApiTarget(repo_id, "info", rest[0])
    if head == "tree" and rest:
        return ApiTarget(repo_id, "tree", rest[0], "/".join(rest[1:]))
    return None


def api_targets(parts: list[str], method: str) -> list[ApiTarget]:
    """The readings of ``/api/models/<parts>``: a repo id is ``org/name`` or ``name``, so a
    path may read both ways; the two-part id comes first. Empty when neither reads."""
    readings = []
    if len(parts) >= 2 and (target := _api_tail("/".join(parts[:2]), parts[2:], method)):
        readings.append(target)
    if parts and (target := _api_tail(parts[0], parts[1:], method)):
        readings.append(target)
    return readings


def resolve_targets(parts: list[str]) -> list[ResolveTarget]:
    """The readings of ``/<repo>/resolve/<revision>/<path>`` (two-part repo id first)."""
    readings = []
    if len(parts) >= 5 and parts[2] == "resolve":
        readings.append(ResolveTarget("/".join(parts[:2]), parts[3], "/".join(parts[4:])))
    if len(parts) >= 4 and parts[1] == "resolve":
        readings.append(ResolveTarget(parts[0], parts[2], "/".join(parts[3:])))
    return readings


def not_mirrored(parts: list[str]) -> HubError:
    """The answer to a path under /hf that reads as nothing this mirror serves."""
    if parts[:1] in (["datasets"], ["spaces"]) or parts[:2] in (
        ["api", "datasets"],
        ["api", "spaces"],
    ):
        return RepoNotFound("This mirror serves model repositories only, not datasets or spaces")
    return NotMirrored(
        "Not part of the Hub's read protocol this mirror serves: /hf/api/models/{repo}"
        "[/revision/{rev} | /tree/{rev}[/{path}] | /paths-info/{rev}] and "
        "/hf/{repo}/resolve/{rev}/{path}",
    )


def route_kind(raw_path: str, method: str) -> Kind:
    """What a request under /hf is, for counting."""
    parts = segments(raw_path)
    if parts[:2] == ["api", "models"]:
        targets = api_targets(parts[2:], method)
        return targets[0].kind if targets else "other"
    return "resolve" if resolve_targets(parts) else "other"
