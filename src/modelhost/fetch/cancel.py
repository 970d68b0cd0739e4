"""Cancellation tokens: set from the event loop, honoured by worker threads within a second."""

from __future__ import annotations

import threading
from collections.abc import Callable

from modelhost.errors import Cancelled


class CancelToken:
    """A one-way flag with callbacks; callbacks run once, on the thread that cancels.

    Blocking I/O registers a callback that closes its socket, so a cancelled transfer
    stops at once instead of at its next read timeout.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._next_id = 0
        self.reason = "cancelled"

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self, reason: str = "cancelled") -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            callbacks = list(self._callbacks.values())
            self._callbacks.clear()
        for callback in callbacks:
            try:
                callback()
            except OSError:
                pass

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Register ``callback``; returns a function that unregisters it."""
        with self._lock:
            if self._event.is_set():
                run_now = True
            else:
                run_now = False
                token_id = self._next_id
                self._next_id += 1
                self._callbacks[token_id] = callback
        if run_now:
            callback()
            return lambda: None

        def unregister() -> None:
            with self._lock:
                self._callbacks.pop(token_id, None)

        return unregister

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason)

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early (and raising ``Cancelled``) when cancelled."""
        if self._event.wait(seconds):
            raise Cancelled(self.reason)
