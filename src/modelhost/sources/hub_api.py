"""modelhost's own client for the Hub's metadata API: a revision's commit, a commit's files.

Every request goes through the fetch engine (``FetchEngine.get_metadata``): the allow-list
and address checks at every redirect hop, the token only to the Hub endpoint's host, the
upstream timeout and bounded retries, and a cancel token that aborts a request in flight.
Answers that are errors come back as ``HubResponseError`` (status and ``X-Error-Code``) for
the source to explain; nothing here knows what a user should do about them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin

from modelhost.errors import UpstreamError
from modelhost.fetch import CancelToken, FetchEngine
from modelhost.fetch.engine import Document

# A tree listing of more pages than this is refused (the real Hub pages by 1000 entries).
MAX_TREE_PAGES = 1000
_LINK_NEXT = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?', re.IGNORECASE)


class HubResponseError(UpstreamError):
    """The Hub answered a metadata request with an error status (not a transient one)."""

    def __init__(self, document: Document) -> None:
        self.status = document.status
        self.code = document.header("X-Error-Code")
        self.detail = document.header("X-Error-Message") or _json_error(document.body)
        self.url = document.url
        summary = f"{self.status} {self.code}" if self.code else str(self.status)
        super().__init__(
            f"{self.url} answered {summary}: {self.detail or 'no detail'}",
            error=f"Hub answered {self.status}",
        )


@dataclass(frozen=True)
class LfsInfo:
    """The LFS part of a tree entry: the real file's sha256 and size."""

    sha256: str
    size: int
    pointer_size: int | None = None


@dataclass(frozen=True)
class RepoFile:
    """A file of a commit, as the Hub's tree listing gives it (huggingface_hub's names)."""

    path: str
    size: int
    blob_id: str  # git blob id (of the LFS pointer, for LFS files)
    lfs: LfsInfo | None = None


def _json_error(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return str(data.get("error")) if isinstance(data, dict) and data.get("error") else None


def _json(document: Document) -> Any:
    try:
        return json.loads(document.body)
    except ValueError as exc:
        raise UpstreamError(
            f"{document.url} did not answer JSON ({exc}); is HF_ENDPOINT a Hugging Face Hub?",
            error="Invalid Hub answer",
        ) from exc


def _next_page(document: Document) -> str | None:
    """The ``Link: <...>; rel="next"`` URL, resolved against the page's own URL."""
    match = _LINK_NEXT.search(document.header("Link") or "")
    return urljoin(document.url, match.group(1)) if match else None


def _file_entry(item: Any, url: str) -> RepoFile | None:
    """A tree item as a ``RepoFile``; None for directories. Malformed items are refused."""
    if not isinstance(item, dict):
        raise UpstreamError(f"{url}: a tree entry is not an object", error="Invalid Hub answer")
    if item.get("type") != "file":
        return None
    try:
        lfs = item.get("lfs")
        return RepoFile(
            path=str(item["path"]),
            size=int(item["size"]),
            blob_id=str(item["oid"]),
            lfs=(
                LfsInfo(
                    sha256=str(lfs["oid"]),
                    size=int(lfs["size"]),
                    pointer_size=lfs.get("pointerSize"),
                )
                if lfs
                else None
            ),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UpstreamError(
            f"{url}: tree entry {item.get('path')!r} lacks {exc}", error="Invalid Hub answer"
        ) from exc


class HubApi:
    """The two metadata calls a download needs, for one Hub endpoint. Blocking."""

    def __init__(
        self, engine: FetchEngine, endpoint: str, cancel: CancelToken | None = None
    ) -> None:
        self.engine = engine
        self.endpoint = endpoint.rstrip("/")
        self.cancel = cancel

    def _get(self, url: str) -> Document:
        document = self.engine.get_metadata(
            url, cancel=self.cancel, headers={"Accept": "application/json"}
        )
        if document.status >= 300:  # a redirect without Location, or an error
            raise HubResponseError(document)
        return document

    def commit(self, repo_id: str, revision: str) -> str:
        """The 40-hex commit ``revision`` (branch, tag or commit) of ``repo_id`` is at."""
        url = f"{self.endpoint}/api/models/{repo_id}/revision/{quote(revision, safe='')}"
        document = self._get(url)
        info = _json(document)
        sha = info.get("sha") if isinstance(info, dict) else None
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{40}", sha):
            raise UpstreamError(
                f"{self.endpoint} gave no commit for {repo_id}@{revision} ({url})",
                error="Invalid Hub answer",
            )
        return sha

    def list_files(self, repo_id: str, commit: str) -> list[RepoFile]:
        """Every file of ``repo_id`` at ``commit``, following the listing's pages."""
        url: str | None = (
            f"{self.endpoint}/api/models/{repo_id}/tree/{quote(commit, safe='')}"
            "?recursive=true&expand=false"
        )
        files: list[RepoFile] = []
        seen: set[str] = set()
        while url is not None:
            if url in seen or len(seen) >= MAX_TREE_PAGES:
                raise UpstreamError(
                    f"The file listing of {repo_id}@{commit} does not end (page {url} again, "
                    f"or more than {MAX_TREE_PAGES} pages)",
                    error="Invalid Hub answer",
                )
            seen.add(url)
            document = self._get(url)
            items = _json(document)
            if not isinstance(items, list):
                raise UpstreamError(
                    f"{document.url}: the file listing is not a list", error="Invalid Hub answer"
                )
            files += [f for item in items if (f := _file_entry(item, document.url)) is not None]
            url = _next_page(document)
        return files


def resolve_url(endpoint: str, repo_id: str, path: str, commit: str) -> str:
    """The ``resolve`` URL of a file (what ``huggingface_hub.hf_hub_url`` builds)."""
    return f"{endpoint.rstrip('/')}/{repo_id}/resolve/{quote(commit, safe='')}/{quote(path)}"
