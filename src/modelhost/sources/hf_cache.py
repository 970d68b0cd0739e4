"""The huggingface source without a network (``HF_HUB_OFFLINE=1``): a huggingface_hub cache.

The cache layout is huggingface_hub's: ``<HF_HUB_CACHE>/models--org--name/`` holds
``refs/<revision>`` (a file with the commit sha), ``snapshots/<commit>/<path>`` (symlinks) and
``blobs/<etag>``, the file's bytes named by the ETag the Hub served them with: the sha256 for
LFS files, the git blob id for the others. So the cache records every file's digest, and an
install from it is verified like a download: each blob is copied into the store only if its
bytes hash to its name. Not one request goes out.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from modelhost.errors import InvalidRequest, UpstreamError, UpstreamNotFound
from modelhost.fetch import FileSpec
from modelhost.fetch.engine import local_url
from modelhost.sources.base import DownloadRequest, PicklePolicy
from modelhost.sources.hf_select import RepoSnapshot, select_for_request
from modelhost.sources.hub_api import LfsInfo, RepoFile

COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    """Where huggingface_hub caches a model repository."""
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def not_cached(repo_id: str, cache_dir: Path, detail: str = "") -> UpstreamNotFound:
    """The 404 for a repository (or revision) the offline cache does not hold."""
    return UpstreamNotFound(
        f"{repo_id} is not in the local cache (offline): HF_HUB_CACHE={cache_dir}{detail}; "
        "download it on a connected machine with huggingface_hub into that cache, or unset "
        "HF_HUB_OFFLINE",
        error="Not in the local cache",
    )


def resolve_commit(cache_dir: Path, repo_id: str, revision: str) -> str:
    """The commit ``revision`` (a branch or tag in ``refs/``, or a commit sha) names."""
    folder = repo_folder(cache_dir, repo_id)
    if not folder.is_dir():
        raise not_cached(repo_id, cache_dir)
    if COMMIT.fullmatch(revision):
        commit = revision
    else:
        parts = PurePosixPath(revision).parts
        if not parts or revision.startswith("/") or any(p in ("..", ".") for p in parts):
            raise InvalidRequest(f"Invalid revision {revision!r}", error="Invalid revision")
        try:
            commit = (folder / "refs" / revision).read_text().strip()
        except OSError:
            raise not_cached(repo_id, cache_dir, f" (no revision {revision!r} there)") from None
        if not COMMIT.fullmatch(commit):
            raise UpstreamError(f"The local cache's refs/{revision} of {repo_id} is not a commit")
    if not (folder / "snapshots" / commit).is_dir():
        raise not_cached(repo_id, cache_dir, f" (no snapshot of commit {commit})")
    return commit


def _cached_file(snapshot_dir: Path, path: Path, repo_id: str, cache_dir: Path) -> RepoFile:
    """One snapshot entry as the Hub would list it, with the digest its blob's name records."""
    relative = path.relative_to(snapshot_dir).as_posix()
    if not path.is_symlink():
        raise UpstreamError(
            f"{relative} of {repo_id} in the local cache is a plain file, not a link to a blob, "
            "so its digest is unknown and it cannot be verified",
            error="Unverifiable cache entry",
        )
    blob = path.resolve()
    if not blob.is_file():
        raise not_cached(repo_id, cache_dir, f" ({relative} links to a missing blob)")
    name = blob.name
    size = blob.stat().st_size
    if SHA256.fullmatch(name):
        # The pointer's blob id is not in the cache; LFS files are verified by sha256.
        return RepoFile(path=relative, size=size, blob_id="", lfs=LfsInfo(sha256=name, size=size))
    if COMMIT.fullmatch(name):
        return RepoFile(path=relative, size=size, blob_id=name)
    raise UpstreamError(
        f"{relative} of {repo_id} in the local cache links to {name}, which is not a digest",
        error="Unverifiable cache entry",
    )


def cached_files(cache_dir: Path, repo_id: str, commit: str) -> list[RepoFile]:
    """Every file of the cached snapshot, in path order."""
    snapshot_dir = repo_folder(cache_dir, repo_id) / "snapshots" / commit
    entries = sorted(p for p in snapshot_dir.rglob("*") if p.is_symlink() or p.is_file())
    return [_cached_file(snapshot_dir, p, repo_id, cache_dir) for p in entries]


def specs(cache_dir: Path, snapshot: RepoSnapshot, prefix: str) -> list[FileSpec]:
    """The files to import: each from its blob, verified against the digest in its name.

    The URL is the blob's ``file:`` URL: the engine then has no network copy to fall back
    to, so a blob that fails verification fails the install."""
    snapshot_dir = repo_folder(cache_dir, snapshot.repo_id) / "snapshots" / snapshot.commit
    result = []
    for entry in snapshot.files:
        if PurePosixPath(entry.path).name == ".gitattributes":
            continue
        local = snapshot_dir / entry.path
        result.append(
            FileSpec(
                url=local_url(local.resolve()),
                path=prefix + entry.path,
                size=entry.lfs.size if entry.lfs else entry.size,
                sha256=entry.lfs.sha256 if entry.lfs else None,
                git_sha1=None if entry.lfs else entry.blob_id,
                local_source=str(local),
            )
        )
    return result


def snapshot(
    cache_dir: Path | None,
    repo_id: str,
    revision: str,
    request: DownloadRequest | None,
    allow_pickle: bool = False,
    pickle_policy: PicklePolicy = "convert",
) -> RepoSnapshot:
    """``HuggingFaceSource.snapshot`` from the cache: the same selection of files."""
    if cache_dir is None:
        raise InvalidRequest("HF_HUB_OFFLINE is set but there is no HF_HUB_CACHE to install from")
    commit = resolve_commit(cache_dir, repo_id, revision)
    files = cached_files(cache_dir, repo_id, commit)
    files = select_for_request(files, request, allow_pickle, pickle_policy)
    if not files:
        raise InvalidRequest(
            f"No cached files of {repo_id}@{revision} match the patterns given (offline)"
        )
    return RepoSnapshot(repo_id, revision, commit, files)
