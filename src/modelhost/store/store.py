"""The on-disk cache: content-addressed blobs, a directory of links per model, a manifest each.

Layout under the store root::

    blobs/sha256/<hex>           every file once, named by its digest, read-only
    models/<name>/<rel path>     symlinks into blobs: a directory from_pretrained can open
    manifests/<name>.json        written last: a model exists exactly when its manifest does

A commit writes the model directory under a temporary name, renames it into place, then
writes the manifest (temp file, fsync, rename). A crash at any point leaves either the old
state or the new one visible; ``recover()`` sweeps what a crash left behind.
"""

from __future__ import annotations

import json
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


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        self.manifests_dir = self.root / "manifests"
        for directory in (self.blobs_dir, self.models_dir, self.manifests_dir):
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
        """Install a model atomically: blobs first, then its directory, then its manifest.

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
        staging = self.models_dir / f"{TMP_PREFIX}{name}.{uuid.uuid4().hex}"
        with self._lock:
            try:
                return self._commit_locked(manifest, entries, name, staging)
            except OSError as exc:
                shutil.rmtree(staging, ignore_errors=True)
                if exc.errno in DISK_FULL_ERRNOS:
                    raise _disk_full(exc) from exc
                raise

    def _commit_locked(
        self,
        manifest: Manifest,
        entries: list[tuple[PurePosixPath, CommitFile]],
        name: str,
        staging: Path,
    ) -> Manifest:
        """``commit``'s steps, under the lock. On an error nothing new is visible: the
        previous model directory, if any, is put back before the error goes up."""
        for _, item in entries:
            self._adopt_blob(item)
        staging.mkdir()
        for rel, item in entries:
            link = staging / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            blob = self.blob_path(item.sha256)
            link.symlink_to(os.path.relpath(blob, link.parent))
        final = self.models_dir / name
        old = None
        if final.exists():
            old = self.models_dir / f"{TMP_PREFIX}old-{name}.{uuid.uuid4().hex}"
            os.replace(final, old)
        os.replace(staging, final)
        now = _utcnow()
        manifest = manifest.model_copy(
            update={
                "files": [
                    ManifestFile(
                        path=str(rel), size=item.size, sha256=item.sha256, git_sha1=item.git_sha1
                    )
                    for rel, item in entries
                ],
                "downloaded_at": manifest.downloaded_at or now,
                "last_used": now,
            }
        )
        try:
            _fsync_dir(self.models_dir)
            _write_atomic(self._manifest_path(name), manifest.model_dump_json(indent=2).encode())
        except BaseException:
            # The manifest still describes the previous state: make the directory match it.
            os.replace(final, staging)
            if old is not None:
                os.replace(old, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            self._collect_garbage()
        return manifest

    def _adopt_blob(self, item: CommitFile) -> None:
        blob = self.blob_path(item.sha256)
        if blob.is_file():
            if item.local_path is not None:
                item.local_path.unlink(missing_ok=True)
            return
        if item.local_path is None:
            raise InvalidRequest(f"Blob {item.sha256} for {item.path} is not in the store")
        os.chmod(item.local_path, 0o444)
        os.replace(item.local_path, blob)
        _fsync_dir(self.blobs_dir)

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
            self._manifest_path(name).unlink()  # invisible from here on
            _fsync_dir(self.manifests_dir)
            shutil.rmtree(self.models_dir / manifest.name, ignore_errors=True)
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
        """Sweep what an interrupted commit or delete left: staging dirs, stray temp files,
        model directories without a manifest, blobs no manifest references."""
        with self._lock:
            installed = {m.name for m in self.list()}
            for entry in self.models_dir.iterdir():
                if entry.name.startswith(TMP_PREFIX) or entry.name not in installed:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
            for entry in self.manifests_dir.glob(f"{TMP_PREFIX}*"):
                entry.unlink(missing_ok=True)
            self._collect_garbage()

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
    data = json.loads(manifest.model_dump_json())
    data["path"] = str(store.model_path(manifest.name))
    return data
