"""Keep-alive in the server's life: the idle reaper, and the reload at start.

``IdleReaper`` is one asyncio task per server. It sleeps until the next model is due to be
unloaded for being idle (``ModelLifecycle.expiries``), at most ``max_sleep_s``, and unloads
the due ones through ``ModelLifecycle.unload_expired`` in a thread (the event loop never
waits for memory to be freed). A request that ends on a model whose keep-alive is shorter
than one sleep wakes it at once (``lifecycle.on_idle``), so keep-alive 0 unloads right after
the request.

``restore_later`` loads the pinned and kept-for-ever models again after a start, in a
thread, once the server answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelhost.runtime.lifecycle import ModelLifecycle
    from modelhost.runtime.loaded import LoadedModel

log = logging.getLogger(__name__)

MAX_SLEEP_S = 1.0  # the reaper looks at least this often (keep-alives change meanwhile)


class IdleReaper:
    """Unloads models idle past their keep-alive; ``start`` and ``stop`` on the event loop."""

    def __init__(self, lifecycle: ModelLifecycle, max_sleep_s: float = MAX_SLEEP_S) -> None:
        self.lifecycle = lifecycle
        self.max_sleep_s = max_sleep_s
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin reaping (call on the server's event loop)."""
        self._loop = asyncio.get_running_loop()
        self.lifecycle.on_idle = self._on_idle
        self._task = asyncio.create_task(self._run(), name="modelhost-idle-reaper")

    async def stop(self) -> None:
        """Stop reaping (an unload under way finishes in its thread)."""
        self.lifecycle.on_idle = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_idle(self, model: LoadedModel) -> None:
        """A model's last request ended (any thread): wake the reaper when the model is
        due before its next look."""
        if 0 <= model.keep_alive_s < self.max_sleep_s and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the server stopped
                self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before looking: a wake-up during the look is not lost
            await self._reap()
            # asyncio.TimeoutError: the builtin one only from Python 3.11 on.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._delay())

    async def _reap(self) -> None:
        """Unload every model due now."""
        now = time.monotonic()
        for name, when in self.lifecycle.expiries():
            if when > now:
                continue
            try:
                report = await asyncio.to_thread(self.lifecycle.unload_expired, name, now)
            except Exception:  # one failed unload must not stop the reaper
                log.exception("unloading idle model %s failed", name)
                continue
            if report is not None:
                log.info("unloaded %s: idle past its keep-alive", name)

    def _delay(self) -> float:
        """Seconds until the next model is due, at most ``max_sleep_s``."""
        due = [when for _, when in self.lifecycle.expiries()]
        if not due:
            return self.max_sleep_s
        return min(self.max_sleep_s, max(0.0, min(due) - time.monotonic()))


async def restore_later(lifecycle: ModelLifecycle, delay_s: float) -> None:
    """After ``delay_s`` (the server answers first), load the pinned models and those kept
    for ever when the server stopped (``ModelLifecycle.restore``), in a thread."""
    await asyncio.sleep(delay_s)
    restored = await asyncio.to_thread(lifecycle.restore)
    if restored:
        log.info("loaded again at start: %s", ", ".join(restored))
