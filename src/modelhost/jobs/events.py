"""Job events for live progress streams: a status event on every change of a job's state or
phase, progress events while its bytes move.

The bus lives on the event loop. Publishing never waits: each subscriber has a bounded queue,
and a subscriber that does not keep up loses progress events (the next one supersedes them)
before it loses a status event. A subscription costs nothing once closed.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

from modelhost.jobs.models import JobView

QUEUE_SIZE = 256


class EventKind(str, enum.Enum):
    STATUS = "status"  # the state or phase changed (the first event of a stream is one too)
    PROGRESS = "progress"  # bytes moved


@dataclass(frozen=True)
class JobEvent:
    kind: EventKind
    view: JobView

    @property
    def download_id(self) -> str:
        return self.view.job.id

    @property
    def terminal(self) -> bool:
        """The job's last event: it reached completed, failed or cancelled."""
        return self.kind == EventKind.STATUS and self.view.job.state.finished


class Subscription:
    """One listener's queue of events, for one job or (``job_id`` None) for all of them."""

    def __init__(self, bus: EventBus, job_id: str | None) -> None:
        self._bus = bus
        self.job_id = job_id
        self._queue: asyncio.Queue[JobEvent] = asyncio.Queue(maxsize=QUEUE_SIZE)

    def wants(self, event: JobEvent) -> bool:
        return self.job_id is None or self.job_id == event.download_id

    def offer(self, event: JobEvent) -> None:
        """Queue ``event`` without waiting; a full queue drops progress first."""
        if self._queue.full():
            if event.kind == EventKind.PROGRESS:
                return
            self._drop_one()
        self._queue.put_nowait(event)

    def _drop_one(self) -> None:
        """Make room for a status event: the oldest progress event goes, else the oldest."""
        kept = [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        for index, event in enumerate(kept):
            if event.kind == EventKind.PROGRESS:
                del kept[index]
                break
        else:
            del kept[0]
        for event in kept:
            self._queue.put_nowait(event)

    async def next(self) -> JobEvent:
        """The next event (waits for one)."""
        return await self._queue.get()

    def close(self) -> None:
        self._bus.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """Fan-out of job events to the open streams."""

    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()

    def subscribe(self, job_id: str | None = None) -> Subscription:
        subscription = Subscription(self, job_id)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def has_subscribers(self, job_id: str) -> bool:
        return any(s.job_id in (None, job_id) for s in self._subscriptions)

    def publish(self, event: JobEvent) -> None:
        for subscription in list(self._subscriptions):
            if subscription.wants(event):
                subscription.offer(event)
