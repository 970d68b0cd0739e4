"""Safe extraction of a fetched zip archive (a GitHub repository snapshot) into files.

Every entry is checked before anything is written: no absolute paths, no ``..``, no links,
bounded count and size. GitHub's archives wrap everything in one top-level directory
(``repo-ref/``), which is stripped.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from modelhost.errors import FetchError, InsufficientStorage, InvalidRequest
from modelhost.names import check_path_limits

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
        check_path_limits(name)  # a name the filesystem cannot hold fails here, with a message
        checked.append((member, PurePosixPath(name)))
    tops = {path.parts[0] for _, path in checked}
    if len(tops) == 1 and all(len(path.parts) > 1 for _, path in checked):
        checked = [(m, PurePosixPath(*path.parts[1:])) for m, path in checked]
    _refuse_collisions([path for _, path in checked])
    return checked


def _refuse_collisions(paths: list[PurePosixPath]) -> None:
    """Refuse entries that cannot all be unpacked: one name twice (which would win is
    ambiguous), or a file where another entry needs a directory. Checked before any write,
    so the job fails with the entry's name rather than an ``OSError`` halfway through."""
    files: set[PurePosixPath] = set()
    for path in paths:
        if path in files:
            raise InvalidRequest(
                f"Archive entry {str(path)!r} appears twice; nothing was installed",
                error="Bad archive",
            )
        files.add(path)
    for path in paths:
        for parent in path.parents:
            if parent in files:
                raise InvalidRequest(
                    f"Archive entry {str(parent)!r} is both a file and a directory "
                    f"(it holds {str(path)!r}); nothing was installed",
                    error="Bad archive",
                )


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
            size, digest = _extract_member(archive, member, target)
            extracted.append(ExtractedFile(str(relative), target, size, digest))
    return extracted


def _extract_member(
    archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path
) -> tuple[int, str]:
    """Write one entry to ``target``; its CRC and declared size must match what it unpacks to.

    zipfile checks the CRC at the entry's end; a declared size that lies shows up as a CRC
    error, a truncated stream or a count that differs. Any of them: ``FetchError``.
    """
    digest = hashlib.sha256()
    size = 0
    try:
        with archive.open(member) as source, open(target, "wb") as sink:
            while chunk := source.read(1024 * 1024):
                digest.update(chunk)
                sink.write(chunk)
                size += len(chunk)
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as exc:
        raise _corrupt(member, str(exc) or type(exc).__name__) from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise InsufficientStorage(
                f"No space left to unpack the archive ({exc.strerror}); free disk space under "
                "MODELHOST_HOME, then retry. Nothing was installed",
                error="Disk full",
            ) from exc
        raise
    if size != member.file_size:
        raise _corrupt(member, f"it unpacks to {size} bytes, its header says {member.file_size}")
    return size, digest.hexdigest()


def _corrupt(member: zipfile.ZipInfo, why: str) -> FetchError:
    return FetchError(
        f"corrupt archive: {member.filename} ({why}); the extraction was removed and "
        "nothing was installed",
        error="Corrupt archive",
    )


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
