"""A real loopback HTTP/1.1 file server with fault injection, for tests.

Stdlib only (``http.server.ThreadingHTTPServer``). One ``FileServer`` serves byte strings or
files from disk on ``127.0.0.1`` at a free port, in a daemon thread::

    with FileServer() as srv:
        srv.add("/model.bin", tmp_path / "model.bin", faults=[DropAfter(1000)])
        download(srv.url("/model.bin"))
        assert srv.count("GET", "/model.bin") == 2

HTTP semantics
--------------
* ``GET`` and ``HEAD``; other methods get 501. Unknown paths get 404. A query string is
  ignored for matching; paths are compared percent-decoded.
* Every response carries ``Content-Length``. Resources also carry ``ETag``, ``Last-Modified``,
  ``Accept-Ranges: bytes`` and ``Content-Type: application/octet-stream``.
* ``Range`` (GET only, as RFC 9110 says; HEAD ignores it): ``bytes=N-``, ``bytes=N-M`` (M is
  clamped to the end) and ``bytes=-K`` (the last K bytes) give 206 with
  ``Content-Range: bytes N-M/TOTAL``. A syntactically valid range starting at or after the end
  gives 416 with ``Content-Range: bytes */TOTAL`` and an empty body. An invalid or multi-range
  header is ignored (200, full body).
* ``If-Range``: an entity tag matches only by strong comparison with the current ETag (a weak
  ``W/`` tag never matches); an HTTP-date matches when it equals ``Last-Modified`` to the
  second. No match: the Range is ignored and the full current content is sent with 200.
* Connections are persistent (``protocol_version = "HTTP/1.1"``, keep-alive) unless the client
  asks for ``Connection: close``; a ``DropAfter`` fault closes its connection. ``stop()``
  closes all connections, idle keep-alive ones included.
* Default ``Last-Modified`` is a minute before ``add``; each new version (``replace``,
  ``ChangeAfterFirst``) gets one strictly later (at least one second) than the previous one,
  so date validators always tell versions apart.
* Throttling (``FileServer(rate_bytes_per_s=...)``, or a path's ``Rate`` fault, which overrides
  it): the body goes out in pieces of about rate/50 bytes, paced so that the bytes sent by time
  t after the headers never exceed rate * t (a ``Stall`` restarts the pacing: no catch-up burst).

Faults
------
Faults are per path and act on GET only (HEAD is never faulted). Every fault in the list is
armed from the start and counts its own uses:

* The *outcome* faults ``Status``, ``DropAfter`` and ``Stall`` form a queue: each GET is
  affected by the first one in list order that is not used up, which uses one of its
  ``times``. So ``[Status(503), DropAfter(10)]`` answers 503, then drops, then serves normally.
  An outcome fault with ``at=N`` applies only to GETs whose ``Range`` starts at byte N (one
  part of a multi-connection download); other GETs pass it by without using it.
* The *modifiers* ``Corrupt``, ``IgnoreRange``, ``IgnoreIfRange``, ``NoValidators`` and ``Rate``
  apply together
  to every GET that serves content (a GET answered by ``Status`` neither sees nor uses them);
  ``times=k`` means the next k such GETs, ``None`` forever.
* ``ChangeAfterFirst`` fires on the first GET (whatever its outcome): that response is served
  from the old version, and every request that starts after it sees the new one. The switch
  happens when that GET starts, so it is visible before the client can see the first response
  finish or be cut: there is no race for the client's next attempt.

Signed redirects
----------------
``add_signed_redirect(path, target, ttl_s)`` answers ``path`` with a 302 to
``target?expires=<unix time + ttl_s>`` (a fresh one each time, like the Hub's CDN links), and
``target`` then answers 403 to any GET whose ``expires`` is missing or past (HEAD too).

Connections
-----------
``open_connections()`` is how many client connections the server holds open right now (idle
keep-alive ones included): a client that closed its sockets sees it fall to zero.
``most_bodies_at_once()`` is the most GET bodies it has sent at the same time: a
multi-connection download's concurrent connections, counted exactly (no sampling).
``connections_accepted()`` counts every connection it accepted (a client that reuses its
kept-alive connections opens fewer than it makes requests).

Request log
-----------
A ``RequestRecord`` is appended when a request's response is decided, before any of it is
written, and ``body_bytes_sent`` is raised just before each ``send``; so once a client has
seen a response, its record exists and its count covers every byte the client received.
``body_bytes_sent`` counts bytes the kernel accepted into the socket; bytes accepted but lost
to a reset are still counted.
"""

from __future__ import annotations

import email.utils
import hashlib
import pathlib
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, unquote, urlsplit

__all__ = [
    "ChangeAfterFirst",
    "Corrupt",
    "DropAfter",
    "Fault",
    "FileServer",
    "IgnoreIfRange",
    "IgnoreRange",
    "NoValidators",
    "Rate",
    "RequestRecord",
    "Stall",
    "Status",
    "corrupt_bytes",
    "default_etag",
]

_CHUNK = 256 * 1024  # unthrottled send / disk read size
_CORRUPT_STRIDE = 1024


# --------------------------------------------------------------------------- faults


@dataclass
class Status:
    """Answer with ``code`` and a short text body instead of the content.

    429 and 503 carry ``Retry-After: 0`` unless ``retry_after`` says otherwise.
    """

    code: int
    times: int = 1
    retry_after: int | None = None
    at: int | None = None  # only GETs whose Range starts here (None: every GET)


@dataclass
class DropAfter:
    """Send the headers and the first ``nbytes`` of the (possibly ranged) body, then shut
    the socket down and close it. If ``nbytes`` covers the whole body, the body is complete
    and the connection is closed anyway."""

    nbytes: int
    times: int = 1
    at: int | None = None  # only GETs whose Range starts here (None: every GET)


@dataclass
class Stall:
    """Send ``after`` body bytes, send nothing for ``seconds``, then finish normally.
    No stall if the body is not longer than ``after``."""

    after: int
    seconds: float
    times: int = 1
    at: int | None = None  # only GETs whose Range starts here (None: every GET)


@dataclass
class Corrupt:
    """Serve same-length bytes with some flipped (see ``corrupt_bytes``); headers unchanged."""

    times: int | None = None


@dataclass
class IgnoreRange:
    """Ignore ``Range``: always 200 with the full body."""

    times: int | None = None


@dataclass
class IgnoreIfRange:
    """Honour ``Range`` even when ``If-Range`` does not match (non-compliant server); the
    ``ETag`` header is still the current one."""

    times: int | None = None


@dataclass
class NoValidators:
    """Send neither ``ETag`` nor ``Last-Modified`` (a server that offers nothing to resume
    with); an ``If-Range`` then never matches, so a ranged GET gets the whole body."""

    times: int | None = None


@dataclass
class ChangeAfterFirst:
    """After the first GET the resource becomes ``new_data`` (new ETag, later
    Last-Modified). ``etag`` overrides the new default ETag."""

    new_data: bytes | pathlib.Path
    etag: str | None = None


@dataclass
class Rate:
    """Throttle this path's response bodies to about ``bytes_per_s`` (overrides the
    server-wide rate)."""

    bytes_per_s: int
    times: int | None = None


Fault = (
    Status
    | DropAfter
    | Stall
    | Corrupt
    | IgnoreRange
    | IgnoreIfRange
    | NoValidators
    | ChangeAfterFirst
    | Rate
)

_OUTCOME = (Status, DropAfter, Stall)


# --------------------------------------------------------------------------- records


class _CIDict(dict[str, str]):
    """A dict of header values whose lookups ignore case (keys keep the client's spelling)."""

    def _key(self, key: str) -> str:
        low = key.lower()
        for k in dict.keys(self):
            if k.lower() == low:
                return k
        return key

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, self._key(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and dict.__contains__(self, self._key(key))

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return dict.get(self, self._key(key), default)


@dataclass
class RequestRecord:
    """One request as the server saw it.

    ``path`` is percent-decoded and without query (``query`` is the raw query string);
    ``headers`` looks names up case-blind; ``range_start`` is the first byte the Range header
    asked for (None without a valid single range), whether or not it was honoured; ``faults``
    names the faults applied.
    """

    method: str
    path: str
    headers: dict[str, str]
    range_start: int | None
    status: int
    body_bytes_sent: int = 0
    faults: tuple[str, ...] = ()
    query: str = ""


# --------------------------------------------------------------------------- content


def default_etag(data: bytes | pathlib.Path) -> str:
    """The default strong ETag: ``'"<first 16 hex digits of sha256(content)>"'``."""
    h = hashlib.sha256()
    if isinstance(data, pathlib.Path):
        with data.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    else:
        h.update(data)
    return f'"{h.hexdigest()[:16]}"'


def corrupt_bytes(chunk: bytes, offset: int, first: int) -> bytes:
    """Flip (XOR 0xFF) the bytes of ``chunk`` at absolute offsets that are multiples of 1024,
    and the byte at absolute offset ``first`` (the first byte of the response body), so any
    non-empty body is damaged. ``offset`` is the absolute offset of ``chunk[0]``."""
    buf = bytearray(chunk)
    positions = set(range((-offset) % _CORRUPT_STRIDE, len(buf), _CORRUPT_STRIDE))
    if offset <= first < offset + len(buf):
        positions.add(first - offset)
    for i in positions:
        buf[i] ^= 0xFF
    return bytes(buf)


@dataclass(frozen=True)
class _Version:
    """One immutable version of a resource's content."""

    data: bytes | None
    path: pathlib.Path | None
    size: int
    etag: str
    mtime: int  # seconds since the epoch, for Last-Modified
    last_modified: str

    def chunks(self, start: int, end: int, size: int) -> Iterator[bytes]:
        """Yield the bytes ``[start, end)`` in pieces of at most ``size``."""
        if self.data is not None:
            view = memoryview(self.data)
            for pos in range(start, end, size):
                yield bytes(view[pos : min(end, pos + size)])
            return
        assert self.path is not None
        with self.path.open("rb") as f:
            f.seek(start)
            pos = start
            while pos < end:
                block = f.read(min(size, end - pos))
                if not block:
                    raise OSError(f"{self.path} shrank while being served")
                pos += len(block)
                yield block


def _make_version(
    data: bytes | pathlib.Path,
    etag: str | None,
    last_modified: str | None,
    previous: _Version | None,
) -> _Version:
    if isinstance(data, pathlib.Path):
        size, blob, path = data.stat().st_size, None, data
    elif isinstance(data, (bytes, bytearray, memoryview)):
        blob = bytes(data)
        size, path = len(blob), None
    else:
        raise TypeError(f"data must be bytes or pathlib.Path, not {type(data).__name__}")
    # A minute in the past, so that up to ~60 quick versions still predate the Date header.
    mtime = int(time.time()) - 60
    if previous is not None:
        mtime = max(mtime, previous.mtime + 1)
    if last_modified is None:
        last_modified = email.utils.formatdate(mtime, usegmt=True)
    return _Version(
        data=blob,
        path=path,
        size=size,
        etag=etag if etag is not None else default_etag(data if path is None else path),
        mtime=mtime,
        last_modified=last_modified,
    )


@dataclass
class _Armed:
    fault: Fault
    left: int | None  # uses left; None = forever


@dataclass
class _Entry:
    version: _Version | None = None
    redirect: tuple[int, str] | None = None  # (status, location)
    faults: list[_Armed] = field(default_factory=list)
    signed_ttl_s: float | None = None  # the redirect appends ?expires=now+ttl
    signed: bool = False  # GETs need an unexpired ?expires= (a signed redirect's target)


@dataclass
class _Plan:
    """What one GET does, decided atomically when it arrives."""

    version: _Version | None
    outcome: Status | DropAfter | Stall | None = None
    corrupt: bool = False
    ignore_range: bool = False
    ignore_if_range: bool = False
    no_validators: bool = False
    rate: int | None = None
    names: tuple[str, ...] = ()


def _arm(faults: list[Fault] | None) -> list[_Armed]:
    armed = []
    for f in faults or []:
        if not isinstance(f, Fault):  # type: ignore[arg-type,misc]
            raise TypeError(f"not a fault: {f!r}")
        if isinstance(f, ChangeAfterFirst) and f.etag is None:
            f = replace(f, etag=default_etag(f.new_data))  # hash now, not under the lock
        armed.append(_Armed(replace(f), getattr(f, "times", 1)))
    return armed


# --------------------------------------------------------------------------- range logic


def _parse_range(value: str | None, size: int) -> tuple[int, int] | str | None:
    """Parse a Range header against ``size``.

    Returns ``(start, end_exclusive)`` for a satisfiable single range, ``"unsatisfiable"`` for
    a valid one that is not, and None for no / invalid / multiple ranges (to be ignored).
    """
    if value is None:
        return None
    unit, sep, spec = value.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size
    start = int(first)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    end = size if last == "" else min(size, int(last) + 1)
    return start, end


def _range_start(value: str | None) -> int | None:
    """The first byte a Range header asks for, size-independent where possible."""
    if value is None:
        return None
    unit, sep, spec = value.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if dash and first.isdigit() and (last == "" or (last.isdigit() and int(last) >= int(first))):
        return int(first)
    return None


def _if_range_matches(value: str, version: _Version) -> bool:
    """RFC 9110 13.1.5: strong ETag comparison, or an exact Last-Modified date."""
    value = value.strip()
    if value.startswith("W/") or version.etag.startswith("W/"):
        return False
    if value.startswith('"'):
        return value == version.etag
    if value == version.etag:
        return True
    try:
        asked = email.utils.parsedate_to_datetime(value)
        have = email.utils.parsedate_to_datetime(version.last_modified)
    except (TypeError, ValueError, IndexError):
        return False
    return asked.timestamp() == have.timestamp()


# --------------------------------------------------------------------------- server


class _Stopped(Exception):
    """The server is stopping; abandon the response."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    owner: FileServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which can hang without DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        self.owner._track(request, True)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        try:
            super().shutdown_request(request)
        finally:
            self.owner._track(request, False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # client resets and stop() are routine in tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fileserver/1"
    disable_nagle_algorithm = True
    timeout = 30  # idle keep-alive connections and blocked sends
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    # -- helpers (also used by subclasses: see hubserver.py)

    def _record(self) -> RequestRecord:
        """A fresh, not yet logged record of the current request."""
        url = urlsplit(self.path)
        return RequestRecord(
            method=self.command,
            path=unquote(url.path),
            headers=_CIDict(self.headers.items()),
            range_start=_range_start(self.headers.get("Range")),
            status=0,
            query=url.query,
        )

    def _serve(self, head: bool) -> None:
        owner = self.server.owner
        record = self._record()
        path, range_header = record.path, self.headers.get("Range")
        entry, plan = owner._plan(path, head, None if head else record.range_start)
        record.faults = plan.names
        try:
            if entry is None:
                self._simple(record, 404, b"not found\n")
            elif plan.outcome is not None and isinstance(plan.outcome, Status):
                self._status_fault(record, plan.outcome)
            elif entry.signed and not _unexpired(record.query):
                self._simple(record, 403, b"signature expired\n")
            elif entry.redirect is not None:
                code, location = entry.redirect
                if entry.signed_ttl_s is not None:
                    location = f"{location}?expires={time.time() + entry.signed_ttl_s:.3f}"
                self._simple(record, code, b"", {"Location": location})
            else:
                self._content(record, plan, head, range_header)
        except (OSError, _Stopped):
            self.close_connection = True
        if not owner.keep_alive:
            self.close_connection = True  # without saying so, as an idle timeout does

    def _begin(self, record: RequestRecord, code: int, headers: dict[str, str]) -> None:
        record.status = code
        self.server.owner._log(record)
        self.send_response(code)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _simple(
        self,
        record: RequestRecord,
        code: int,
        body: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        if code in (204, 304) or 100 <= code < 200:
            body = b""
            hdrs = dict(headers or {})
        else:
            hdrs = {
                "Content-Type": "text/plain",
                "Content-Length": str(len(body)),
                **(headers or {}),
            }
        self._begin(record, code, hdrs)
        if self.command != "HEAD" and body:
            self._write(record, body)

    def _status_fault(
        self, record: RequestRecord, fault: Status, extra: dict[str, str] | None = None
    ) -> None:
        headers: dict[str, str] = dict(extra or {})
        retry = fault.retry_after
        if retry is None and fault.code in (429, 503):
            retry = 0
        if retry is not None:
            headers["Retry-After"] = str(retry)
        self._simple(record, fault.code, f"injected {fault.code}\n".encode(), headers)

    def _content(
        self,
        record: RequestRecord,
        plan: _Plan,
        head: bool,
        range_header: str | None,
        extra: dict[str, str] | None = None,
    ) -> None:
        """Serve the plan's version (200, 206 or 416); ``extra`` headers go on every answer."""
        version = plan.version
        assert version is not None
        size = version.size
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": version.etag,
            "Last-Modified": version.last_modified,
            **(extra or {}),
        }
        if plan.no_validators:
            del headers["ETag"], headers["Last-Modified"]
        wanted = None
        if not head and not plan.ignore_range:
            wanted = _parse_range(range_header, size)
            if_range = self.headers.get("If-Range")
            if (
                wanted is not None
                and if_range is not None
                and not plan.ignore_if_range
                and (plan.no_validators or not _if_range_matches(if_range, version))
            ):
                wanted = None
        if wanted == "unsatisfiable":
            headers.update({"Content-Range": f"bytes */{size}", "Content-Length": "0"})
            self._begin(record, 416, headers)
            return
        if isinstance(wanted, tuple):
            start, end = wanted
            code = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        else:
            start, end, code = 0, size, 200
        headers["Content-Length"] = str(end - start)
        self._begin(record, code, headers)
        if not head:
            owner = self.server.owner
            owner._body_started(+1)
            try:
                self._body(record, plan, start, end)
            finally:
                owner._body_started(-1)

    def _body(self, record: RequestRecord, plan: _Plan, start: int, end: int) -> None:
        """Write ``[start, end)`` of the plan's version, applying faults and throttling."""
        assert plan.version is not None
        outcome = plan.outcome
        length = end - start
        drop_at = outcome.nbytes if isinstance(outcome, DropAfter) else None
        stall = outcome if isinstance(outcome, Stall) and outcome.after < length else None
        limit = length if drop_at is None else max(0, min(length, drop_at))
        rate = plan.rate
        piece = _CHUNK if rate is None else max(1, min(_CHUNK, rate // 50))

        sent = 0
        pace_t0, pace_base = time.monotonic(), 0
        if stall is not None and stall.after == 0:
            self._sleep(stall.seconds)
            pace_t0, stall = time.monotonic(), None
        for chunk in plan.version.chunks(start, start + limit, _CHUNK):
            if plan.corrupt:
                chunk = corrupt_bytes(chunk, start + sent, start)
            view = memoryview(chunk)
            while view:
                n = len(view) if rate is None else min(len(view), piece)
                if stall is not None:
                    n = min(n, stall.after - sent)
                if rate is not None:
                    due = pace_t0 + (sent + n - pace_base) / rate
                    self._sleep(due - time.monotonic())
                self._write(record, view[:n])
                view, sent = view[n:], sent + n
                if stall is not None and sent == stall.after:
                    self._sleep(stall.seconds)
                    pace_t0, pace_base, stall = time.monotonic(), sent, None
        if drop_at is not None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self.server.owner._stopping.wait(seconds):
            raise _Stopped

    def _write(self, record: RequestRecord, data: bytes | memoryview) -> None:
        """Send all of ``data``, counting it in ``record`` before each send (see module doc);
        with a ``link``, each slice waits for its turn on the server's one uplink."""
        owner = self.server.owner
        view = memoryview(data)
        if owner.link is not None and len(view) > _LINK_SLICE:
            for offset in range(0, len(view), _LINK_SLICE):
                self._write(record, view[offset : offset + _LINK_SLICE])
            return
        if owner.link is not None:
            self._sleep(owner.link.wait_for(len(view)))
        while view:
            owner._add_sent(record, len(view))
            try:
                n = self.connection.send(view)
            except OSError:
                owner._add_sent(record, -len(view))
                raise
            owner._add_sent(record, n - len(view))
            view = view[n:]


_LINK_SLICE = 16 * 1024  # the uplink's unit: small, so connections interleave finely


class Link:
    """One uplink every connection of the server shares, at ``bytes_per_s`` in all: slices
    are sent one after another at its pace, so one connection gets all of it and two get
    half each (a saturated server, as a CDN's per-client cap or a full uplink is). No burst:
    the capacity is the same however many connections share it."""

    def __init__(self, bytes_per_s: int) -> None:
        if bytes_per_s <= 0:
            raise ValueError("a link's rate must be positive")
        self.bytes_per_s = bytes_per_s
        self._lock = threading.Lock()
        self._free_at = time.monotonic()

    def wait_for(self, nbytes: int) -> float:
        """Book ``nbytes`` on the link; seconds to wait until they may be sent."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = start + nbytes / self.bytes_per_s
            return start - now


class FileServer:
    """Context manager; serves on 127.0.0.1 on a free port in a daemon thread.

    ``rate_bytes_per_s`` throttles every response body (a path's ``Rate`` fault overrides it);
    ``link_bytes_per_s`` is the server's total rate, shared by every connection (``Link``).
    ``keep_alive=False`` closes every connection after its response without saying so (no
    ``Connection: close``), as a server whose idle timeout ran out does.
    Resources can be added before or after ``start()``.
    """

    _handler_class: type[BaseHTTPRequestHandler] = _Handler  # subclasses may route differently

    def __init__(
        self,
        rate_bytes_per_s: int | None = None,
        link_bytes_per_s: int | None = None,
        keep_alive: bool = True,
    ) -> None:
        if rate_bytes_per_s is not None and rate_bytes_per_s <= 0:
            raise ValueError("rate_bytes_per_s must be positive")
        self.rate_bytes_per_s = rate_bytes_per_s
        self.keep_alive = keep_alive
        self._accepted = 0  # connections accepted
        self.link = None if link_bytes_per_s is None else Link(link_bytes_per_s)
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._log_records: list[RequestRecord] = []
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_idle = threading.Condition(self._lock)
        self._bodies = 0  # GET bodies being sent right now
        self._most_bodies = 0
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> FileServer:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread."""
        if self._httpd is not None or self._stopping.is_set():
            raise RuntimeError("FileServer can be started once")
        httpd = _HTTPServer(("127.0.0.1", 0), self._handler_class)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"{type(self).__name__.lower()}:{httpd.server_port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, cut every open connection (idle keep-alive ones too), abandon
        stalls and throttles, and wait (up to 5 s) for handler threads to finish."""
        httpd = self._httpd
        if httpd is None or self._stopping.is_set():
            self._stopping.set()
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            for sock in list(self._conns):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._conns_idle.wait_for(lambda: not self._conns, timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FileServer:
        if self._httpd is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("FileServer is not started")
        return self._httpd.server_port

    @property
    def host_port(self) -> str:
        """``"127.0.0.1:PORT"``."""
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """``"http://127.0.0.1:PORT"``."""
        return f"http://{self.host_port}"

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` (percent-encoded)."""
        return self.base_url + quote(_norm(path), safe="/")

    # -- content

    def add(
        self,
        path: str,
        data: bytes | pathlib.Path,
        *,
        etag: str | None = None,
        last_modified: str | None = None,
        faults: list[Fault] | None = None,
    ) -> None:
        """Serve ``data`` at ``path`` (replacing whatever was there, faults included).

        A ``pathlib.Path`` is streamed from disk on each request and must not change while
        served (use ``replace``). The default ETag hashes the content once, here.
        """
        version = _make_version(data, etag, last_modified, None)
        armed = _arm(faults)
        with self._lock:
            self._entries[_norm(path)] = _Entry(version=version, faults=armed)

    def replace(self, path: str, data: bytes | pathlib.Path, etag: str | None = None) -> None:
        """Publish a new version of an existing resource: new content, its ETag (the default
        one is content-based, so identical content keeps its ETag), a later Last-Modified.
        Faults are kept."""
        key = _norm(path)
        with self._lock:
            entry = self._entries[key]
            previous = entry.version
        version = _make_version(data, etag, None, previous)
        with self._lock:
            self._entries[key].version = version
            self._entries[key].redirect = None

    def add_redirect(self, path: str, location: str, status: int = 302) -> None:
        """Answer GET and HEAD of ``path`` with ``status`` and ``Location: location``
        (sent as given: absolute URL or path)."""
        with self._lock:
            self._entries[_norm(path)] = _Entry(redirect=(status, location))

    def add_signed_redirect(self, path: str, target: str, ttl_s: float) -> None:
        """Answer ``path`` with a 302 to ``target?expires=...`` valid for ``ttl_s`` seconds;
        ``target`` (added already) then refuses GETs without an unexpired one (403)."""
        with self._lock:
            self._entries[_norm(path)] = _Entry(redirect=(302, target), signed_ttl_s=ttl_s)
            self._entries[_norm(target)].signed = True

    def open_connections(self) -> int:
        """Client connections open right now (idle keep-alive ones included)."""
        with self._lock:
            return len(self._conns)

    def connections_accepted(self) -> int:
        """Client connections this server has accepted since it started."""
        with self._lock:
            return self._accepted

    def most_bodies_at_once(self) -> int:
        """The most GET response bodies this server was sending at the same time (a
        download's concurrent connections, counted where they arrive; idle connections and
        HEADs are not counted)."""
        with self._lock:
            return self._most_bodies

    def set_faults(self, path: str, faults: list[Fault]) -> None:
        """Replace the faults of ``path`` with fresh ones (use counts start over). Only
        ``Status`` acts on a redirect."""
        armed = _arm(faults)
        with self._lock:
            self._entries[_norm(path)].faults = armed

    def etag(self, path: str) -> str:
        """The current ETag of ``path``."""
        with self._lock:
            version = self._entries[_norm(path)].version
        if version is None:
            raise KeyError(f"{path} is a redirect")
        return version.etag

    def last_modified(self, path: str) -> str:
        """The current Last-Modified of ``path``."""
        with self._lock:
            version = self._entries[_norm(path)].version
        if version is None:
            raise KeyError(f"{path} is a redirect")
        return version.last_modified

    # -- request log

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot (copies) of the request log, oldest first."""
        with self._lock:
            return [replace(r) for r in self._log_records]

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """How many logged requests match ``method`` and ``path`` (None matches all)."""
        key = None if path is None else _norm(path)
        with self._lock:
            return sum(
                1
                for r in self._log_records
                if (method is None or r.method == method.upper()) and (key is None or r.path == key)
            )

    def bytes_sent(self, path: str | None = None) -> int:
        """Total response-body bytes written to sockets (for ``path``, or all)."""
        key = None if path is None else _norm(path)
        with self._lock:
            return sum(r.body_bytes_sent for r in self._log_records if key is None or r.path == key)

    def reset_log(self) -> None:
        """Forget all logged requests (responses in flight stop being counted)."""
        with self._lock:
            self._log_records = []

    # -- internals used by the handler

    def _plan(
        self, path: str, head: bool, range_start: int | None = None
    ) -> tuple[_Entry | None, _Plan]:
        """Decide, atomically, which version and faults this request gets (``range_start``:
        where the request's Range starts, for outcome faults given ``at``)."""
        with self._lock:
            entry = self._entries.get(path)
            if entry is None:
                return None, _Plan(None)
            plan = _Plan(entry.version, rate=self.rate_bytes_per_s)
            if head:
                return entry, plan
            live = [a for a in entry.faults if a.left is None or a.left > 0]
            used: list[_Armed] = []
            outcome = next(
                (
                    a
                    for a in live
                    if isinstance(a.fault, _OUTCOME)
                    and (a.fault.at is None or a.fault.at == range_start)
                ),
                None,
            )
            if outcome is not None:
                plan.outcome = outcome.fault  # type: ignore[assignment]
                used.append(outcome)
            if not isinstance(plan.outcome, Status) and entry.redirect is None:
                for a in live:
                    f = a.fault
                    if isinstance(f, Corrupt):
                        plan.corrupt = True
                    elif isinstance(f, IgnoreRange):
                        plan.ignore_range = True
                    elif isinstance(f, IgnoreIfRange):
                        plan.ignore_if_range = True
                    elif isinstance(f, NoValidators):
                        plan.no_validators = True
                    elif isinstance(f, Rate):
                        plan.rate = f.bytes_per_s
                    else:
                        continue
                    used.append(a)
            for a in live:
                if isinstance(a.fault, ChangeAfterFirst) and entry.version is not None:
                    new = a.fault
                    entry.version = _make_version(new.new_data, new.etag, None, entry.version)
                    used.append(a)
            for a in used:
                if a.left is not None:
                    a.left -= 1
            plan.names = tuple(type(a.fault).__name__ for a in used)
            return entry, plan

    def _log(self, record: RequestRecord) -> None:
        with self._lock:
            self._log_records.append(record)

    def _body_started(self, change: int) -> None:
        with self._lock:
            self._bodies += change
            self._most_bodies = max(self._most_bodies, self._bodies)

    def _add_sent(self, record: RequestRecord, n: int) -> None:
        with self._lock:
            record.body_bytes_sent += n

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(sock)
                self._accepted += 1
            else:
                self._conns.discard(sock)
                self._conns_idle.notify_all()


def _unexpired(query: str) -> bool:
    """Whether a signed URL's ``expires=`` (unix time) is present and still in the future."""
    for item in query.split("&"):
        name, _, value = item.partition("=")
        if name == "expires":
            try:
                return float(value) > time.time()
            except ValueError:
                return False
    return False


def _norm(path: str) -> str:
    """Resource keys are decoded paths starting with '/'."""
    return path if path.startswith("/") else "/" + path
