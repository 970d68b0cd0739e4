"""Safe extraction of a fetched zip archive (a GitHub repository snapshot) into files.

Every entry is checked before anything is written: no absolute paths, no ``..``, no links,
bounded count and size. GitHub's archives wrap everything in one top-level directory
(``repo-ref/``), which is stripped.
"""

from __future__ import annotations

import hashlib
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from modelhost.errors import InvalidRequest

MAX_ENTRIES = 20_000
MAX_TOTAL_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class ExtractedFile:
    path: str  # relative path inside the model
    local_path: Path
    size: int
    sha256: str


def _member_paths(archive: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    members = [m for m in archive.infolist() if not m.is_dir()]
    if len(members) > MAX_ENTRIES:
        raise InvalidRequest(f"The archive has {len(members)} files, more than {MAX_ENTRIES}")
    if sum(m.file_size for m in members) > MAX_TOTAL_BYTES:
        raise InvalidRequest("The archive unpacks to more than 4 GiB; refused")
    checked = []
    for member in members:
        name = member.filename
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
            raise InvalidRequest(
                f"Archive entry {name!r} would escape the model directory; nothing was installed",
                error="Unsafe archive",
            )
        if stat.S_ISLNK(member.external_attr >> 16):
            raise InvalidRequest(
                f"Archive entry {name!r} is a link; refused", error="Unsafe archive"
            )
        checked.append((member, PurePosixPath(name)))
    tops = {path.parts[0] for _, path in checked}
    if len(tops) == 1 and all(len(path.parts) > 1 for _, path in checked):
        checked = [(m, PurePosixPath(*path.parts[1:])) for m, path in checked]
    return checked


def extract_zip(archive_path: Path, destination: Path) -> list[ExtractedFile]:
    """Unpack ``archive_path`` under ``destination``; every entry checked before any write."""
    try:
        archive = zipfile.ZipFile(archive_path)
    except zipfile.BadZipFile as exc:
        raise InvalidRequest(f"Not a zip archive: {exc}", error="Bad archive") from exc
    with archive:
        members = _member_paths(archive)
        destination.mkdir(parents=True, exist_ok=True)
        extracted = []
        for member, relative in members:
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with archive.open(member) as source, open(target, "wb") as sink:
                while chunk := source.read(1024 * 1024):
                    digest.update(chunk)
                    sink.write(chunk)
            extracted.append(
                ExtractedFile(str(relative), target, member.file_size, digest.hexdigest())
            )
    return extracted


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
