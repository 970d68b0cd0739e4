"""Each loaded model's own inference worker, with a bounded queue and dynamic batching.

Inference never runs on asyncio's default thread pool, which the control plane (status,
lists, cache info, database writes) needs free. Every loaded model gets one worker thread
(``LoadedModel.lock`` serialises a model anyway, so more threads per model would only wait);
``Workers`` keeps them, and the lifecycle owns that (``ModelLifecycle.workers``).
Requests queue on it, at most ``MAX_QUEUED`` of them; one more is refused with
``QueueFull`` (503) instead of waiting without bound.

The worker is also a micro-batcher. A request that can batch carries a ``group`` key (for
example ``("embed", normalize)``): requests with equal keys may run as one forward. The
worker takes the oldest request, then every queued request of its group, up to
``max_batch_size`` items (a request with a list of inputs counts as its items). When the
model is busy (the last batch had company, or others were already queued), it waits up to
``max_batch_delay_ms`` for more; an idle model runs a lone request at once, so batching costs
a single caller no latency. ``max_batch_size`` 1 is the plain serial worker.

This module does not import torch: it schedules callables; ``runtime.inference`` supplies
the batch functions.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modelhost.errors import InvalidRequest, ModelhostError

if TYPE_CHECKING:
    from modelhost.runtime.loaded import LoadedModel

MAX_QUEUED = 256  # requests waiting on one model before new ones are refused (503)
IDLE_EXIT_S = 30.0  # an idle worker thread ends; the next request starts a new one
BATCH_SIZE_RANGE = (1, 256)
BATCH_DELAY_RANGE = (0.0, 1000.0)


class QueueFull(ModelhostError):
    """The model's inference queue is full: retry later (503)."""

    status_code = 503
    error = "Inference queue full"


@dataclass(frozen=True)
class BatchSettings:
    """How a model coalesces concurrent requests (``POST /models/{name}/load`` body)."""

    max_batch_size: int = 32
    max_batch_delay_ms: float = 5.0

    def __post_init__(self) -> None:
        low, high = BATCH_SIZE_RANGE
        size = self.max_batch_size
        if isinstance(size, bool) or not isinstance(size, int) or not low <= size <= high:
            raise InvalidRequest(
                f"max_batch_size must be an integer from {low} to {high} (1 turns batching "
                f"off), got {size!r}",
                error="Invalid batch settings",
            )
        low_d, high_d = BATCH_DELAY_RANGE
        delay = self.max_batch_delay_ms
        if isinstance(delay, bool) or not isinstance(delay, int | float):
            raise InvalidRequest(
                "max_batch_delay_ms must be a number", error="Invalid batch settings"
            )
        if not low_d <= float(delay) <= high_d:
            raise InvalidRequest(
                f"max_batch_delay_ms must be from {low_d:g} to {high_d:g}, got {delay!r}",
                error="Invalid batch settings",
            )

    def describe(self) -> dict[str, Any]:
        return {
            "max_batch_size": self.max_batch_size,
            "max_batch_delay_ms": self.max_batch_delay_ms,
        }


@dataclass
class BatchStats:
    """What the worker ran: forward calls (``batches_run``), items, and batch sizes."""

    batches_run: int = 0
    items_run: int = 0
    largest_batch: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # size -> how many batches
    refused: int = 0

    def record(self, items: int) -> None:
        self.batches_run += 1
        self.items_run += items
        self.largest_batch = max(self.largest_batch, items)
        self.batch_sizes[items] = self.batch_sizes.get(items, 0) + 1

    def describe(self, queued: int) -> dict[str, Any]:
        return {
            "batches_run": self.batches_run,
            "items_run": self.items_run,
            "largest_batch": self.largest_batch,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "queued": queued,
            "refused": self.refused,
        }


@dataclass(eq=False)
class Work:
    """One caller's request: ``items`` inputs; ``group`` None when it cannot batch.

    ``run_one`` computes it alone. Batchable work also carries ``payload`` for the group's
    batch function, which takes the payloads of a batch and returns one result (or an
    exception) per payload, in order.
    """

    run_one: Callable[[], Any]
    group: Hashable | None = None
    items: int = 1
    payload: Any = None
    future: Future = field(default_factory=Future)


BatchFn = Callable[[Sequence[Any]], list[Any]]


class ModelWorker:
    """The one thread that runs a loaded model's inference, batching where it can."""

    def __init__(self, loaded: LoadedModel) -> None:
        self._loaded = weakref.ref(loaded)
        self._name = loaded.name
        self._pending: collections.deque[Work] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = False  # the last batch had company: wait for more next time
        self.batch_fns: dict[Hashable, BatchFn] = {}

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    def submit(self, work: Work, batch_fn: BatchFn | None = None) -> Future:
        """Queue ``work``; its future gets the result. ``QueueFull`` when the queue is."""
        loaded = self._loaded()
        with self._cond:
            if len(self._pending) >= MAX_QUEUED:
                if loaded is not None:
                    loaded.batch_stats.refused += 1
                raise QueueFull(
                    f"Model '{self._name}' has {len(self._pending)} requests in its inference "
                    "queue, the most it holds: retry shortly, or load another copy elsewhere",
                )
            if work.group is not None and batch_fn is not None:
                self.batch_fns[work.group] = batch_fn
            self._pending.append(work)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name=f"infer-{self._name}", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return work.future

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[Work] | None:
        """The next batch to run, or None when the thread should end (idle or unloaded)."""
        with self._cond:
            idle_since = time.monotonic()
            while not self._pending:
                loaded = self._loaded()
                if loaded is None or not loaded.loaded:
                    self._thread = None
                    return None
                if time.monotonic() - idle_since > IDLE_EXIT_S:
                    self._thread = None
                    return None
                self._cond.wait(timeout=1.0)
            first = self._pending.popleft()
            loaded = self._loaded()
            settings = loaded.batching if loaded is not None else BatchSettings(1, 0)
            if first.group is None or settings.max_batch_size <= 1:
                return [first]
            contended = self._busy or bool(self._pending)
            batch = [first]
            deadline = time.monotonic() + (settings.max_batch_delay_ms / 1000 if contended else 0)
            while True:
                self._take_group(batch, settings.max_batch_size)
                left = deadline - time.monotonic()
                if sum(w.items for w in batch) >= settings.max_batch_size or left <= 0:
                    break
                self._cond.wait(timeout=left)
            return batch

    def _take_group(self, batch: list[Work], limit: int) -> None:
        """Move queued work of ``batch``'s group into it, oldest first, up to ``limit``."""
        group = batch[0].group
        size = sum(w.items for w in batch)
        kept: collections.deque[Work] = collections.deque()
        while self._pending:
            work = self._pending.popleft()
            if work.group == group and size + work.items <= limit:
                batch.append(work)
                size += work.items
            else:
                kept.append(work)
        self._pending = kept

    def _run(self, batch: list[Work]) -> None:
        # A caller that went away (its request cancelled) is dropped before it runs.
        batch = [w for w in batch if w.future.set_running_or_notify_cancel()]
        if not batch:
            return
        loaded = self._loaded()
        self._busy = len(batch) > 1
        if len(batch) == 1:
            self._run_alone(batch[0], loaded)
            return
        fn = self.batch_fns[batch[0].group]
        try:
            results = fn([w.payload for w in batch])
        except BaseException:  # noqa: BLE001 - the batch failed: each caller alone
            for work in batch:
                self._run_alone(work, loaded)
            return
        if loaded is not None:
            loaded.batch_stats.record(sum(w.items for w in batch))
        for work, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                work.future.set_exception(result)
            else:
                work.future.set_result(result)

    @staticmethod
    def _run_alone(work: Work, loaded: LoadedModel | None) -> None:
        try:
            result = work.run_one()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            work.future.set_exception(exc)
            return
        finally:
            if loaded is not None:
                loaded.batch_stats.record(work.items)
        work.future.set_result(result)


class Workers:
    """The inference workers of one server's loaded models: one per ``LoadedModel`` object
    (a reload makes a new object, so it gets a new worker). The lifecycle owns the server's
    (``ModelLifecycle.workers``). Entries go with their model objects (weak keys); a
    worker's thread ends by itself once its model is unloaded or idle."""

    def __init__(self) -> None:
        self._workers: weakref.WeakKeyDictionary[LoadedModel, ModelWorker] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def worker_for(self, loaded: LoadedModel) -> ModelWorker:
        """The worker of ``loaded``, made on its first request."""
        with self._lock:
            worker = self._workers.get(loaded)
            if worker is None:
                worker = self._workers[loaded] = ModelWorker(loaded)
            return worker

    def queued(self, loaded: LoadedModel) -> int:
        """How many requests wait on ``loaded``'s worker (0 when it has none)."""
        with self._lock:
            worker = self._workers.get(loaded)
        return worker.queued if worker is not None else 0
