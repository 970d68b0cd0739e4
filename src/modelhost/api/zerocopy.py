"""uvicorn's HTTP/1.1 protocol (h11) with ASGI's zero-copy send extension: a response can hand
the server an open file, and the server sends its bytes with ``sendfile(2)`` (asyncio's
``loop.sendfile``), kernel to socket, never through Python's memory.

Why here: Starlette's ``FileResponse`` reads files in 64 KiB chunks through worker threads
(it sends without copying only through ``http.response.pathsend``, which uvicorn does not
implement), and an ASGI app cannot reach the socket; only the server can. ``modelhost
serve`` (and the tests' servers) run uvicorn with ``ZeroCopyH11Protocol``; each request's
scope then carries ``extensions["http.response.zerocopysend"]``, and an app that sees it may
send ``{"type": "http.response.zerocopysend", "file": f, "offset": o, "count": n,
"more_body": False}`` after ``http.response.start`` (``api/hf.py``'s file answers do). Under
another server the extension is absent and the app sends ordinary body messages.

How: h11 frames body data by its length alone (``send_with_data_passthrough`` passes the
object through untouched, for exactly this use), so a placeholder of the file span's length
goes through h11's bookkeeping (Content-Length or chunking) and ``loop.sendfile`` writes the
bytes where the placeholder sits. The rest of uvicorn's request cycle is unchanged.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

ZEROCOPY = "http.response.zerocopysend"


class _Sent:
    """Bytes sent with sendfile by every server of this process (diagnostics and tests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0

    def add(self, count: int) -> None:
        with self._lock:
            self.bytes += count


SENT = _Sent()


class _Span:
    """Stands for ``count`` file bytes in h11's output: h11 only asks its ``len``."""

    __slots__ = ("count",)

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count


class ZeroCopyH11Protocol(H11Protocol):
    """uvicorn's h11 protocol; each request's cycle also takes ``http.response.zerocopysend``."""

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        # A request cycle just made (its task has not run yet: it starts once this callback
        # returns to the loop) gets the extension; one already running is left as it is.
        if cycle is not None and not cycle.response_started and not cycle.response_complete:
            extensions = cycle.scope.setdefault("extensions", {})  # type: ignore[typeddict-item]
            if ZEROCOPY not in extensions:
                extensions[ZEROCOPY] = {}
                plain = cycle.send
                cycle.send = lambda message: _send(cycle, plain, message)  # type: ignore[method-assign]


async def _send(cycle: RequestResponseCycle, plain: Any, message: Any) -> None:
    """The cycle's ``send``, with the zero-copy message added."""
    if message["type"] != ZEROCOPY:
        await plain(message)
        return
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected:
        return
    if not cycle.response_started or cycle.response_complete:
        raise RuntimeError(f"Unexpected ASGI message {ZEROCOPY!r} outside a response body")
    file = message["file"]
    offset = message.get("offset")
    offset = file.tell() if offset is None else offset
    count = message.get("count")
    count = os.fstat(file.fileno()).st_size - offset if count is None else count
    body = count > 0 and cycle.scope["method"] != "HEAD"
    if body and not await _sendfile(cycle, file, offset, count):
        return
    if not message.get("more_body", False):
        # An empty last body message: uvicorn ends the response (keep-alive, next request).
        await plain({"type": "http.response.body", "body": b"", "more_body": False})


async def _sendfile(cycle: RequestResponseCycle, file: Any, offset: int, count: int) -> bool:
    """Send ``count`` bytes of ``file`` from ``offset`` in h11's framing; False (connection
    closed) when the client went away or the file ended early."""
    pieces = cycle.conn.send_with_data_passthrough(h11.Data(data=_Span(count)))  # type: ignore[arg-type]
    for piece in pieces or ():
        if not isinstance(piece, _Span):
            cycle.transport.write(piece)
            continue
        sent = 0
        if not cycle.transport.is_closing():
            try:
                sent = await asyncio.get_running_loop().sendfile(
                    cycle.transport, file, offset, count
                )
            except OSError:  # the client went away mid-file
                sent = 0
        SENT.add(sent)
        if sent != count:
            # The response can no longer be framed right: end the connection.
            cycle.disconnected = True
            cycle.transport.close()
            return False
    return True
