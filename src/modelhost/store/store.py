"""The on-disk cache: content-addressed blobs, a directory of links per model version, a
manifest per model.

Layout under the store root::

    blobs/sha256/<hex>                every file once, named by its digest, read-only
    versions/<name>.<id>/<rel path>   symlinks into blobs: one directory per committed version
    models/<name> -> ../versions/<name>.<id>   the directory from_pretrained opens
    manifests/<name>.json             the model: its files, and the version directory it uses

The manifest is the one switch: a model exists, in the version its manifest names
(``Manifest.version_dir``), exactly when its manifest does. A commit

1. moves the verified files into ``blobs/`` (each fsynced, then ``blobs/`` fsynced);
2. writes the new version's directory under a name no other version has, fsyncs each of its
   directories and ``versions/``, and makes a temporary link to it in ``models/``;
3. writes the manifest naming that directory (temp file, fsync, rename, fsync of
   ``manifests/``): the switch;
4. renames the temporary link over ``models/<name>`` (fsync of ``models/``);
5. removes the previous version's directory and the blobs no manifest references any more.

Nothing before step 3 touches what the previous version uses, and step 3 comes after
everything the new version needs is durable; a delete removes the manifest first. So a crash
at any instant leaves exactly one whole version with its manifest (or none), and
``recover()`` at start finishes the rest: it points ``models/<name>`` at the version its
manifest names and sweeps whatever no manifest names (other version directories, temporary
links and files, unreferenced blobs). ``tests/test_store_crash.py`` SIGKILLs commits and
deletes after each of their disk steps and checks exactly this.

Stores written before version directories still open: a manifest without ``version_dir``
has its links in a real directory ``models/<name>/``, which its next commit moves aside
after the switch (step 4).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from modelhost.errors import DISK_FULL_ERRNOS, InsufficientStorage, InvalidRequest, ModelNotFound
from modelhost.names import check_path_limits, validate_name
from modelhost.store.manifest import Manifest, ManifestFile

TMP_PREFIX = ".tmp-"
VERSIONS = "versions"

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    """Make a file's bytes durable (a no-op cost when its writer already did)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(top: Path) -> None:
    """Make a new directory tree's entries durable: each directory, deepest first, then the
    directory that holds ``top``."""
    for directory, _, _ in os.walk(top, topdown=False):
        _fsync_dir(Path(directory))
    _fsync_dir(top.parent)


def _remove(path: Path) -> None:
    """Remove a link, a file or a directory tree; nothing there is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a half-written temp file
        raise
    _fsync_dir(path.parent)


def _disk_full(exc: OSError) -> InsufficientStorage:
    return InsufficientStorage(
        f"No space left to install the model ({os.strerror(exc.errno or 0)}); nothing was "
        "installed. Free disk space under MODELHOST_HOME, then retry",
        error="Insufficient storage",
    )


def safe_relative_path(path: str) -> PurePosixPath:
    """A file's path inside a model directory; refuses anything that could leave it."""
    raw_parts = path.split("/")
    if (
        not path
        or any(part in ("", ".", "..") for part in raw_parts)
        or "\\" in path
        or "\0" in path
        or raw_parts[0].startswith(TMP_PREFIX)
    ):
        raise InvalidRequest(f"Unsafe file path in model: {path!r}", error="Invalid file path")
    return PurePosixPath(check_path_limits(path))


@dataclass(frozen=True)
class CommitFile:
    """A verified file ready to enter the store: where it is now and what it is."""

    path: str  # relative path inside the model directory
    local_path: Path | None  # None when the blob is already in the store
    size: int
    sha256: str
    git_sha1: str | None = None


class Store:
    """Content-addressed model cache. Thread-safe; all methods block (use worker threads)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.models_dir = self.root / "models"
        self.versions_dir = self.root / VERSIONS
        self.manifests_dir = self.root / "manifests"
        for directory in (self.blobs_dir, self.models_dir, self.versions_dir, self.manifests_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # Blobs running jobs decided to reuse, by holder (the job's id): garbage collection
        # and eviction leave them alone until the job lets go (``release_blobs``). In memory
        # on purpose: a job decides its reuse again on every run (after a restart too), and
        # takes its holds then; a hold is never needed across a restart. Issue 21 moves
        # references into the database; holds can go there with them.
        self._holds: dict[str, set[str]] = {}

    # --- reading ---------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise InvalidRequest(f"Not a sha256 hex digest: {sha256!r}")
        return self.blobs_dir / sha256

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def hold_blob(self, holder: str, sha256: str) -> int | None:
        """Hold ``sha256`` for ``holder`` (a running job) if the store has it, and return
        its size; None when it is not there (nothing is held then).

        Checking and holding under the store's lock is what makes a reuse decision safe:
        a delete or an eviction that runs afterwards keeps the blob until
        ``release_blobs(holder)``, so the job's commit still finds it."""
        blob = self.blob_path(sha256)
        with self._lock:
            try:
                size = blob.stat().st_size
            except FileNotFoundError:
                return None
            self._holds.setdefault(holder, set()).add(sha256)
            return size

    def release_blobs(self, holder: str) -> int:
        """Let go of every blob ``holder`` holds (its job committed, failed or was
        cancelled); blobs nothing references any more are removed. Returns bytes freed."""
        with self._lock:
            if self._holds.pop(holder, None) is None:
                return 0
            return self._collect_garbage()

    def held_blobs(self) -> set[str]:
        """The digests running jobs hold (``hold_blob``)."""
        with self._lock:
            return set().union(*self._holds.values())

    def model_path(self, name: str) -> Path:
        return self.models_dir / validate_name(name)

    def _manifest_path(self, name: str) -> Path:
        return self.manifests_dir / f"{validate_name(name)}.json"

    def get(self, name: str) -> Manifest | None:
        """The installed model's manifest, or None."""
        try:
            return Manifest.model_validate_json(self._manifest_path(name).read_bytes())
        except FileNotFoundError:
            return None

    def require(self, name: str) -> Manifest:
        manifest = self.get(name)
        if manifest is None:
            raise ModelNotFound(f"Model not found in cache: {name}")
        return manifest

    def list(self) -> list[Manifest]:
        """Every installed model, by name."""
        manifests = []
        for path in sorted(self.manifests_dir.glob("*.json")):
            if path.name.startswith(TMP_PREFIX):
                continue
            try:
                manifests.append(Manifest.model_validate_json(path.read_bytes()))
            except (ValueError, OSError):
                continue  # a foreign or damaged file is not a model
        return manifests

    def blobs_by_git_sha1(self) -> dict[str, str]:
        """sha256 of every stored file the Hub knows by a git blob id."""
        return {f.git_sha1: f.sha256 for m in self.list() for f in m.files if f.git_sha1}

    def total_size(self) -> int:
        """Bytes on disk in blobs (each shared blob counted once)."""
        return sum(p.stat().st_size for p in self.blobs_dir.iterdir() if p.is_file())

    # --- writing ---------------------------------------------------------------------------

    def commit(self, manifest: Manifest, files: Iterable[CommitFile]) -> Manifest:
        """Install a model atomically: blobs, then a new version directory, then the
        manifest naming it (the switch), then the ``models/<name>`` link (see the module's
        docstring for why this order).

        Files given with a ``local_path`` are moved into the blob store (the caller has
        verified them). Replaces an installed model of the same name as one step.
        """
        files = list(files)
        entries = []
        seen: set[PurePosixPath] = set()
        for item in files:
            rel = safe_relative_path(item.path)
            if rel in seen:
                raise InvalidRequest(f"Duplicate file path in model: {item.path}")
            seen.add(rel)
            entries.append((rel, item))
        name = validate_name(manifest.name)
        with self._lock:
            try:
                return self._commit_locked(manifest, entries, name)
            except OSError as exc:
                if exc.errno in DISK_FULL_ERRNOS:
                    raise _disk_full(exc) from exc
                raise

    def _commit_locked(
        self, manifest: Manifest, entries: list[tuple[PurePosixPath, CommitFile]], name: str
    ) -> Manifest:
        """``commit``'s steps, under the lock. An error before the switch removes what the
        commit wrote and leaves the previous version as it was."""
        previous = self._installed_version(name)
        version = f"{name}.{uuid.uuid4().hex}"
        tree = self.versions_dir / version
        link = None
        try:
            self._adopt_blobs(item for _, item in entries)
            self._write_version(tree, entries)
            link = self._new_link(name, version)
        except BaseException:
            self._discard(tree, link)
            raise
        manifest = self._stamped(manifest, entries, version)
        try:
            _write_atomic(self._manifest_path(name), manifest.model_dump_json(indent=2).encode())
        except BaseException:
            if self._installed_version(name) != version:
                self._discard(tree, link)  # the switch did not happen
                raise
            # Renamed in, but the fsync after it failed: the new version is the model, yet a
            # power loss could still bring the previous one back, so its directory stays
            # (``recover`` keeps whichever the surviving manifest names).
            self._finish(name, link, previous, tidy=False)
            raise
        self._finish(name, link, previous, tidy=True)
        return manifest

    def _stamped(
        self, manifest: Manifest, entries: list[tuple[PurePosixPath, CommitFile]], version: str
    ) -> Manifest:
        """The manifest to write: its files, its version directory, its dates."""
        now = _utcnow()
        files = [
            ManifestFile(path=str(rel), size=item.size, sha256=item.sha256, git_sha1=item.git_sha1)
            for rel, item in entries
        ]
        return manifest.model_copy(
            update={
                "files": files,
                "version_dir": version,
                "downloaded_at": manifest.downloaded_at or now,
                "last_used": now,
            }
        )

    def _adopt_blobs(self, items: Iterable[CommitFile]) -> None:
        """Move each new file into ``blobs/``, its bytes durable before it gets there."""
        moved = False
        for item in items:
            moved = self._adopt_blob(item) or moved
        if moved:
            _fsync_dir(self.blobs_dir)

    def _adopt_blob(self, item: CommitFile) -> bool:
        """Move one file into ``blobs/``; False when the store already has it."""
        blob = self.blob_path(item.sha256)
        if blob.is_file():
            if item.local_path is not None:
                item.local_path.unlink(missing_ok=True)
            return False
        if item.local_path is None:
            raise InvalidRequest(f"Blob {item.sha256} for {item.path} is not in the store")
        # Not every producer fsyncs (conversions, unpacked archives): a manifest must never
        # name a blob whose bytes a power loss could take back.
        _fsync_file(item.local_path)
        os.chmod(item.local_path, 0o444)
        os.replace(item.local_path, blob)
        return True

    def _write_version(self, tree: Path, entries: list[tuple[PurePosixPath, CommitFile]]) -> None:
        """Write a version's directory of links into blobs, durably."""
        tree.mkdir()
        for rel, item in entries:
            link = tree / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(self.blob_path(item.sha256), link.parent))
        _fsync_tree(tree)

    def _version_path(self, version: str) -> Path:
        return self.versions_dir / version

    def _new_link(self, name: str, version: str) -> Path:
        """A temporary link in ``models/`` to ``version``'s directory, made before the switch
        so that the step after it is a rename only (nothing left to allocate)."""
        link = self.models_dir / f"{TMP_PREFIX}{name}.{uuid.uuid4().hex}"
        link.symlink_to(os.path.relpath(self._version_path(version), self.models_dir))
        return link

    def _swap_link(self, link: Path, name: str) -> Path | None:
        """Rename the temporary ``link`` over ``models/<name>``. A real directory there (a
        model committed before version directories) cannot be renamed over: it is moved
        aside first, and returned for the caller to remove."""
        final = self.models_dir / name
        aside = None
        if final.is_dir() and not final.is_symlink():
            aside = self.models_dir / f"{TMP_PREFIX}old-{name}.{uuid.uuid4().hex}"
            os.replace(final, aside)
        os.replace(link, final)
        _fsync_dir(self.models_dir)
        return aside

    def _finish(self, name: str, link: Path, previous: str | None, tidy: bool) -> None:
        """After the switch: point ``models/<name>`` at the new version, then (``tidy``)
        remove the previous version's directory (``previous``) and the blobs nothing
        references any more.

        The new version is already the model, so a failure here is logged, not raised:
        ``recover`` finishes at the next start. While the link is not swapped, the previous
        directory stays, so that ``models/<name>`` still holds one whole version."""
        final = self.models_dir / name
        if not tidy and final.is_dir() and not final.is_symlink():
            # A directory of the previous layout is the previous version itself: it moves
            # aside only once the switch is durable (else ``recover`` does it).
            return
        try:
            aside = self._swap_link(link, name)
        except OSError as exc:
            log.warning("Installed %s; its link is repointed at the next start: %s", name, exc)
            return
        if not tidy:
            return
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        if previous is not None:
            shutil.rmtree(self._version_path(previous), ignore_errors=True)
        try:
            self._collect_garbage()
        except OSError as exc:
            log.warning("Installed %s; unused blobs are removed at the next start: %s", name, exc)

    def _discard(self, tree: Path, link: Path | None) -> None:
        """Remove what a commit wrote before its switch (the blobs stay for ``recover``'s
        or the next commit's garbage collection, as another model may need them)."""
        shutil.rmtree(tree, ignore_errors=True)
        if link is not None:
            link.unlink(missing_ok=True)

    def _installed_version(self, name: str) -> str | None:
        """The version directory the manifest on disk names; None when there is none, when
        the model predates version directories, or when the manifest is unreadable (its
        directory, if any, is then left to ``recover``)."""
        try:
            manifest = self.get(name)
        except (ValueError, OSError):
            return None
        return manifest.version_dir if manifest is not None else None

    def touch(self, name: str) -> None:
        """Record a use of ``name`` (for least-recently-used eviction)."""
        with self._lock:
            manifest = self.get(name)
            if manifest is not None:
                updated = manifest.model_copy(update={"last_used": _utcnow()})
                try:
                    data = updated.model_dump_json(indent=2).encode()
                    _write_atomic(self._manifest_path(name), data)
                except OSError as exc:
                    # Only the eviction order is lost: a full disk must not fail the request.
                    if exc.errno not in DISK_FULL_ERRNOS:
                        raise

    def set_pinned(self, name: str, pinned: bool) -> Manifest:
        """Record ``name``'s pin in its manifest (``evict_to_fit`` never removes a pinned
        model). Raises ``ModelNotFound``."""
        with self._lock:
            manifest = self.require(name).model_copy(update={"pinned": pinned})
            _write_atomic(self._manifest_path(name), manifest.model_dump_json(indent=2).encode())
            return manifest

    def set_load_state(self, name: str, keep_loaded: bool, load_device: str | None) -> None:
        """Record how ``name`` is loaded (``Manifest.keep_loaded``, ``load_device``), read
        again at start; a no-op when the manifest already says so or is gone (deleted)."""
        with self._lock:
            manifest = self.get(name)
            if manifest is None:
                return
            update = {
                "keep_loaded": keep_loaded,
                "load_device": load_device or manifest.load_device,
            }
            if all(getattr(manifest, key) == value for key, value in update.items()):
                return
            updated = manifest.model_copy(update=update)
            _write_atomic(self._manifest_path(name), updated.model_dump_json(indent=2).encode())

    def delete(self, name: str) -> tuple[Manifest, int]:
        """Remove a model, and the blobs no other model uses. Raises ``ModelNotFound``.

        Returns the removed manifest and the bytes freed (shared blobs stay).
        """
        with self._lock:
            manifest = self.require(name)
            self._manifest_path(name).unlink()  # the switch: gone from here on
            _fsync_dir(self.manifests_dir)
            # A link, or a real directory for a model of the previous layout.
            _remove(self.models_dir / manifest.name)
            if manifest.version_dir:
                shutil.rmtree(self._version_path(manifest.version_dir), ignore_errors=True)
            return manifest, self._collect_garbage()

    def evict_to_fit(self, limit_bytes: int, keep: set[str]) -> list[str]:
        """Delete least-recently-used models until under the limit. Never deletes a model in
        ``keep`` (the caller's protected set: the model just installed, loaded and loading
        models) nor a pinned one (``Manifest.pinned``, see ``set_pinned``). Blobs a running
        job holds (``hold_blob``) stay on disk even when their model is evicted."""
        evicted = []
        with self._lock:
            candidates = sorted(
                (m for m in self.list() if m.name not in keep and not m.pinned),
                key=lambda m: m.last_used or m.downloaded_at or _utcnow(),
            )
            for manifest in candidates:
                if self.total_size() <= limit_bytes:
                    break
                self.delete(manifest.name)
                evicted.append(manifest.name)
        return evicted

    def _referenced_blobs(self) -> set[str]:
        """Blobs that must stay: those a manifest names and those a running job holds."""
        return {f.sha256 for m in self.list() for f in m.files} | self.held_blobs()

    def _collect_garbage(self) -> int:
        """Delete blobs no manifest references and no running job holds; returns the bytes
        freed."""
        referenced = self._referenced_blobs()
        freed = 0
        for blob in self.blobs_dir.iterdir():
            if blob.name not in referenced:
                freed += blob.stat().st_size
                blob.unlink(missing_ok=True)
        return freed

    def recover(self) -> None:
        """Finish or undo what an interrupted commit or delete left, keeping exactly what the
        manifests name: each ``models/<name>`` is pointed at the version its manifest names;
        then staging links and directories, model entries without a manifest, temp files,
        version directories no manifest names and unreferenced blobs are swept."""
        with self._lock:
            installed = self.list()
            linked = all([self._sync_link(m) for m in installed if m.version_dir])
            names = {m.name for m in installed}
            for entry in self.models_dir.iterdir():
                if entry.name.startswith(TMP_PREFIX) or entry.name not in names:
                    _remove(entry)
            for entry in self.manifests_dir.glob(f"{TMP_PREFIX}*"):
                entry.unlink(missing_ok=True)
            if not linked:
                # A link still on a previous version keeps that version's files until a
                # start where the link can be swapped (a full disk, say).
                return
            versions = {m.version_dir for m in installed}
            for entry in self.versions_dir.iterdir():
                if entry.name not in versions:
                    _remove(entry)
            self._collect_garbage()

    def _sync_link(self, manifest: Manifest) -> bool:
        """Point ``models/<name>`` at the version its manifest names unless it already does
        (a crash after a commit's switch left it on the previous version, or missing); a
        directory it moves aside is swept with the other temporary entries. False (logged)
        when that fails."""
        name, version = manifest.name, str(manifest.version_dir)
        target = os.path.relpath(self._version_path(version), self.models_dir)
        try:
            if os.readlink(self.models_dir / name) == target:
                return True
        except OSError:
            pass  # missing, or a real directory of the previous layout
        try:
            self._swap_link(self._new_link(name, version), name)
        except OSError as exc:
            log.warning("Cannot point models/%s at its installed version: %s", name, exc)
            return False
        return True

    def verify(self, name: str) -> list[str]:
        """Re-hash a model's blobs; returns the paths whose bytes no longer match."""
        import hashlib

        manifest = self.require(name)
        bad = []
        for item in manifest.files:
            digest = hashlib.sha256()
            try:
                with open(self.blob_path(item.sha256), "rb") as handle:
                    while chunk := handle.read(4 * 1024 * 1024):
                        digest.update(chunk)
            except FileNotFoundError:
                bad.append(item.path)
                continue
            if digest.hexdigest() != item.sha256:
                bad.append(item.path)
        return bad


def describe(manifest: Manifest, store: Store) -> dict:
    """The manifest as the API shows it, with the model's local path."""
    data = json.loads(manifest.model_dump_json(exclude={"version_dir"}))  # the store's own
    data["path"] = str(store.model_path(manifest.name))
    return data
