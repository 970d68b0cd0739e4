"""``/hf``: the Hugging Face Hub's read protocol over the installed ``huggingface`` models, so
that ``HF_ENDPOINT=http://host:8000/hf`` makes Hub clients download from modelhost.

Thin: each route reads its path (raw, so that an encoded ``/`` in a revision stays in its
segment), asks ``mirror/protocol.py`` what it means and what to answer, and sends JSON or a
file. Installed repositories come from ``MirrorIndex`` (in a thread: it reads manifests).
Errors are ``HubError``s that ``api/errors.py`` writes in the Hub's shape. The routes are
out of the OpenAPI schema: they speak the Hub's protocol, not modelhost's (docs/api.md).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, urlencode

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from modelhost.api.deps import Services, ServicesDep, require_api_key
from modelhost.api.zerocopy import ZEROCOPY
from modelhost.errors import InputTooLong, InvalidRequest, ModelhostError
from modelhost.mirror import protocol
from modelhost.mirror.protocol import (
    DEFAULT_REVISION,
    MirrorOff,
    RepoRevision,
    api_targets,
    byte_range,
    file_for,
    file_headers,
    flag,
    is_mirror_path,
    lookup,
    not_mirrored,
    resolve_targets,
    route_kind,
    segments,
)

router = APIRouter(
    prefix=protocol.PREFIX, dependencies=[Depends(require_api_key)], include_in_schema=False
)

PATHS_INFO_MAX_BYTES = 1 << 20  # a paths-info body: a list of paths, never near this
CHUNK = 1 << 20  # reads of the copying fallback (a server without the zero-copy extension)
MISS_CODES = frozenset({"RepoNotFound", "RevisionNotFound", "EntryNotFound"})


def _raw_path(request: Request) -> str:
    """The path as sent, percent-encoding kept (``refs%2Fpr%2F1`` is one segment)."""
    raw = request.scope.get("raw_path")
    return raw.decode("latin-1") if raw else request.scope["path"]


def _mode(services: Services) -> str:
    mode = services.settings.mirror
    if mode == "off":
        raise MirrorOff(
            "modelhost's Hugging Face mirror is off (MODELHOST_MIRROR=off): set "
            "MODELHOST_MIRROR=cache to serve the installed models under /hf",
        )
    return mode


async def _answer(
    services: Services,
    readings: list[tuple[str, str]],
    mode: str,
    answer: Callable[[int, RepoRevision], Any],
) -> Any:
    """``answer(number, revision)`` for the installed revision the readings find, computed in
    a thread: reading manifests blocks, and a large repository's tree (its git ids) costs
    milliseconds the event loop must not spend."""
    index = services.mirror_index
    assert index is not None

    def run() -> Any:
        number, revision = lookup(index.installed(), readings, mode)
        return answer(number, revision)

    return await asyncio.to_thread(run)


def _next_page(request: Request, cursor: str) -> str:
    """The absolute URL of the next page (what ``Link: <...>; rel="next"`` carries)."""
    query = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"]
    query.append(("cursor", cursor))
    return f"{request.url.scheme}://{request.url.netloc}{_raw_path(request)}?{urlencode(query)}"


@router.api_route("/api/models/{rest:path}", methods=["GET", "HEAD"])
async def repo_api(request: Request, services: ServicesDep) -> Response:
    """Model info (``/api/models/{repo}[/revision/{rev}]``) and the tree
    (``/api/models/{repo}/tree/{rev}[/{path}]``)."""
    mode = _mode(services)
    parts = segments(_raw_path(request))
    targets = api_targets(parts[2:], request.method)
    if not targets:
        raise not_mirrored(parts)
    readings = [(t.repo_id, t.revision or DEFAULT_REVISION) for t in targets]
    query = request.query_params

    def answer(number: int, revision: RepoRevision) -> tuple[object, str, str | None]:
        target = targets[number]
        if target.kind == "info":
            return protocol.model_info(revision, flag(query.get("blobs"))), revision.commit, None
        entries = protocol.tree(revision, target.path, flag(query.get("recursive")))
        items, cursor = protocol.page(entries, query.get("cursor"), protocol.TREE_PAGE_SIZE)
        return items, revision.commit, cursor

    body, commit, cursor = await _answer(services, readings, mode, answer)
    headers = {"X-Repo-Commit": commit}
    if cursor is not None:
        headers["Link"] = f'<{_next_page(request, cursor)}>; rel="next"'
    return JSONResponse(body, headers=headers)


@router.post("/api/models/{rest:path}")
async def paths_info(request: Request, services: ServicesDep) -> Response:
    """``POST /api/models/{repo}/paths-info/{rev}``: the entries of the paths asked for
    (form fields ``paths``, as huggingface_hub sends them, or a JSON ``{"paths": [...]}``)."""
    mode = _mode(services)
    parts = segments(_raw_path(request))
    targets = api_targets(parts[2:], "POST")
    if not targets:
        raise not_mirrored(parts)
    paths = _paths(request.headers.get("content-type", ""), await _body(request))
    readings = [(t.repo_id, t.revision or DEFAULT_REVISION) for t in targets]
    body, commit = await _answer(
        services, readings, mode, lambda _, r: (protocol.paths_info(r, paths), r.commit)
    )
    return JSONResponse(body, headers={"X-Repo-Commit": commit})


async def _body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > PATHS_INFO_MAX_BYTES:
            raise InputTooLong(
                f"A paths-info body is at most {PATHS_INFO_MAX_BYTES} bytes",
                error="Body too large",
            )
    return bytes(body)


def _paths(content_type: str, body: bytes) -> list[str]:
    """The ``paths`` of a form or JSON body."""
    try:
        if "json" in content_type:
            data = json.loads(body or b"{}")
            paths = data.get("paths", []) if isinstance(data, dict) else None
            paths = [paths] if isinstance(paths, str) else paths
        else:
            paths = parse_qs(body.decode("utf-8"), keep_blank_values=True).get("paths", [])
    except (ValueError, UnicodeDecodeError):
        paths = None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise InvalidRequest(
            "paths-info takes a form (or JSON object) whose 'paths' are repository paths",
            error="Invalid paths",
        )
    return paths


@router.api_route("/{rest:path}", methods=["GET", "HEAD"])
async def resolve(request: Request, services: ServicesDep) -> Response:
    """``/{repo}/resolve/{rev}/{path}``: a file, whole or one range of it, with the headers
    Hub clients read (``X-Repo-Commit``, ``ETag`` / ``X-Linked-Etag``, sizes)."""
    mode = _mode(services)
    parts = segments(_raw_path(request))
    targets = resolve_targets(parts)
    if not targets:
        raise not_mirrored(parts)
    readings = [(t.repo_id, t.revision) for t in targets]
    revision, found = await _answer(
        services, readings, mode, lambda n, r: (r, file_for(r, targets[n].path))
    )
    span = byte_range(
        request.headers.get("range"), request.headers.get("if-range"), found.etag, found.size
    )
    return BlobResponse(
        services.store.blob_path(found.sha256),
        found.size,
        span,
        file_headers(revision, found),
        on_sent=services.mirror_stats.add_bytes,
    )


class StoreDamaged(ModelhostError):
    status_code = 500
    error = "Store damaged"


def _open_blob(path: Path, size: int) -> IO[bytes]:
    """The blob, opened, if it still is the size its manifest recorded."""
    handle = open(path, "rb")  # noqa: SIM115 (closed by BlobResponse once sent)
    actual = os.fstat(handle.fileno()).st_size
    if actual != size:
        handle.close()
        raise StoreDamaged(
            f"The stored file {path.name} is {actual} bytes where its manifest says {size}: "
            "the store is damaged; install the model again (force)",
        )
    return handle


class BlobResponse(Response):
    """A stored file, whole (200) or one range (206), sent with zero copies when the server
    offers ``http.response.zerocopysend`` (``api/zerocopy.py``), else read in 1 MiB chunks
    in a thread. ``on_sent`` is told the bytes handed to the server."""

    def __init__(
        self,
        path: Path,
        size: int,
        span: tuple[int, int] | None,
        headers: dict[str, str],
        on_sent: Callable[[int], None],
    ) -> None:
        self.path, self.size, self.on_sent = path, size, on_sent
        self.start, self.end = span or (0, size)
        headers = {**headers, "Content-Length": str(self.end - self.start)}
        if span is not None:
            headers["Content-Range"] = f"bytes {self.start}-{self.end - 1}/{size}"
        super().__init__(status_code=206 if span else 200, headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            handle = await anyio.to_thread.run_sync(_open_blob, self.path, self.size)
        except FileNotFoundError:  # the model was deleted since the lookup
            raise protocol.EntryNotFound(
                "The file was removed from the cache meanwhile", self.headers["x-repo-commit"]
            ) from None
        try:
            start = {"status": self.status_code, "headers": self.raw_headers}
            await send({"type": "http.response.start", **start})
            count = self.end - self.start
            if scope["method"] == "HEAD" or count == 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            if ZEROCOPY in scope.get("extensions", {}):
                await send({"type": ZEROCOPY, "file": handle, "offset": self.start, "count": count})
            else:
                await self._copy(handle, send, receive)
            self.on_sent(count)
        finally:
            handle.close()

    async def _copy(self, handle: IO[bytes], send: Send, receive: Receive) -> None:
        """The bytes through Python, chunk by chunk; a client that leaves stops it."""
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()

            group.start_soon(watch)
            offset = self.start
            while offset < self.end:
                length = min(CHUNK, self.end - offset)
                chunk = await anyio.to_thread.run_sync(os.pread, handle.fileno(), length, offset)
                if not chunk:
                    raise StoreDamaged(f"The stored file {self.path.name} ended early")
                offset += len(chunk)
                await send(
                    {"type": "http.response.body", "body": chunk, "more_body": offset < self.end}
                )
            group.cancel_scope.cancel()


class MirrorCounter:
    """Pure ASGI middleware, outermost: counts every request under /hf by route kind and
    status, and its hit or miss (``MirrorStats``), refusals by the guards included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_mirror_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        answer: dict[str, object] = {"status": 500, "code": None}

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                headers = dict(message.get("headers") or ())
                code = headers.get(b"x-error-code")
                answer["code"] = code.decode("latin-1") if code else None
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            services = getattr(scope["app"].state, "services", None)
            if services is not None:
                raw = scope.get("raw_path") or scope["path"].encode()
                kind = route_kind(raw.decode("latin-1"), scope["method"])
                status = int(answer["status"])  # type: ignore[call-overload]
                hit = None if services.settings.mirror == "off" else _hit(status, answer["code"])
                services.mirror_stats.record(kind, status, hit)


def _hit(status: int, code: object) -> bool | None:
    """A 2xx is a hit; a repository, revision or file not installed (or pull-through's
    501) a miss; anything else neither."""
    if 200 <= status < 300:
        return True
    if (status == 404 and code in MISS_CODES) or status == 501:
        return False
    return None
