"""The installed repositories the mirror serves, read from the store's manifests. Blocking:
the routes call ``MirrorIndex.installed`` in a thread."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from modelhost.mirror.protocol import RepoRevision, by_repo
from modelhost.store import Store
from modelhost.store.manifest import Manifest
from modelhost.store.store import TMP_PREFIX

Stamp = tuple[int, int, int]  # inode, size, mtime (ns): a manifest is replaced, never edited


class MirrorIndex:
    """Every installed ``huggingface`` repository by id, kept between requests.

    A request costs one directory scan (a ``stat`` per manifest); a manifest is parsed again
    only when its file changed (a commit, a delete, a pin or a use rewrites it by rename),
    so a snapshot of many files does not parse every manifest for every file it fetches."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._stamps: dict[str, Stamp] = {}
        self._manifests: dict[str, Manifest] = {}
        self._repos: dict[str, list[RepoRevision]] = {}

    def installed(self) -> dict[str, list[RepoRevision]]:
        """The repositories as the manifests on disk say now (do not mutate the result)."""
        with self._lock:
            stamps = self._scan()
            if stamps != self._stamps:
                self._manifests = {
                    name: manifest
                    for name, stamp in stamps.items()
                    if (manifest := self._read(name, stamp)) is not None
                }
                self._stamps = stamps
                self._repos = by_repo(self._manifests.values())
            return self._repos

    def _scan(self) -> dict[str, Stamp]:
        stamps = {}
        try:
            entries = list(os.scandir(self.store.manifests_dir))
        except FileNotFoundError:
            return {}
        for entry in entries:
            if not entry.name.endswith(".json") or entry.name.startswith(TMP_PREFIX):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:  # deleted since the scan
                continue
            stamps[entry.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return stamps

    def _read(self, name: str, stamp: Stamp) -> Manifest | None:
        """The manifest ``name``: kept from the last scan when its stamp did not change."""
        if self._stamps.get(name) == stamp and name in self._manifests:
            return self._manifests[name]
        try:
            return Manifest.model_validate_json(Path(self.store.manifests_dir, name).read_bytes())
        except (ValueError, OSError):
            return None  # a foreign, damaged or just-deleted file is not a model
