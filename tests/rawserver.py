"""A loopback HTTP server that sends exactly the bytes a test scripts, for tests.

``http.server`` refuses to send malformed headers (``Content-Length: 16, 0``); upstreams on
the internet send them anyway. ``RawServer`` answers each request on its own connection
(``Connection: close``) with the status line, headers and body scripted for its method and
path, and logs every request::

    with RawServer() as raw:
        raw.route("GET", "/w.bin", [("Content-Length", "abc")], b"0123")
        ...
        assert raw.count("GET", "/w.bin") == 1
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    status: str  # e.g. "200 OK"
    headers: list[tuple[str, str]]
    body: bytes = b""
    gate: threading.Event | None = None  # the body waits until it is set


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased


class RawServer:
    """Context manager: serves scripted answers on 127.0.0.1 (free port, daemon thread)."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], Answer] = {}
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stopped = False

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.host_port}{path}"

    def route(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes = b"",
        status: str = "200 OK",
        gate: threading.Event | None = None,
    ) -> None:
        """Answer ``method path`` with these headers (sent as given, plus ``Connection:
        close``) and, for GET, this body (once ``gate`` is set, if given); the connection
        closes after it."""
        with self._lock:
            self._routes[(method, path)] = Answer(status, list(headers), body, gate)

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if (r.method, r.path) == (method, path))

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped = True
        try:  # close() alone does not wake a thread blocked in accept(); shutdown() does
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            with self._lock:
                self.requests.append(Seen(method, path, headers))
                answer = self._routes.get((method, path))
            if answer is None:
                answer = Answer("404 Not Found", [("Content-Length", "0")])
            out = [f"HTTP/1.1 {answer.status}", *(f"{k}: {v}" for k, v in answer.headers)]
            out.append("Connection: close")
            try:
                conn.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
                if method != "HEAD" and answer.body:
                    if answer.gate is not None:
                        answer.gate.wait(30)
                    conn.sendall(answer.body)
            except OSError:
                pass  # the client gave up on a lying answer: nothing left to do
