"""Live progress as Server-Sent Events: one job's stream, and every job's (the dashboard's).

Each message is ``event: status`` or ``event: progress`` with the job's status body (as
``GET /models/download/status/{id}`` answers it, plus ``files`` and ``event``) as JSON. A
stream opens with the current state, so a client that connects late misses nothing it needs;
a disconnected client's subscription is closed with its response.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends
from sse_starlette.sse import EventSourceResponse

from modelhost.api.deps import ServicesDep, require_api_key
from modelhost.api.downloads import status_body
from modelhost.api.errors import error_responses
from modelhost.jobs import JobView
from modelhost.jobs.events import EventKind, JobEvent, Subscription

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["downloads"])

PING_S = 15  # a comment line now and then keeps proxies from closing an idle stream
SEND_TIMEOUT_S = 30  # a client that stops reading for this long is dropped
STREAM_DOC = (
    "Server-Sent Events: `event: status` on every change of status or phase, `event: "
    "progress` at most every 250 ms while bytes move; `data` is the status body with "
    "`files` (per-file bytes and status)."
)


def event_message(kind: EventKind, view: JobView) -> dict:
    """One SSE message: its event name and the status body as JSON."""
    body = status_body(view)
    body["event"] = kind.value
    body["files"] = [
        {
            "path": f.path,
            "bytes_downloaded": f.bytes_done,
            "bytes_total": f.bytes_total,
            "status": f.status,
        }
        for f in view.files
    ]
    return {"event": kind.value, "data": json.dumps(body, separators=(",", ":"))}


def _stream(messages: AsyncIterator[dict]) -> EventSourceResponse:
    return EventSourceResponse(
        messages,
        ping=PING_S,
        send_timeout=SEND_TIMEOUT_S,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _forward(subscription: Subscription, stop_at_terminal: bool) -> AsyncIterator[dict]:
    """The subscription's events as SSE messages; closes the subscription when done."""
    with subscription:
        while True:
            event: JobEvent = await subscription.next()
            yield event_message(event.kind, event.view)
            if stop_at_terminal and event.terminal:
                return


@router.get(
    "/models/download/{download_id}/events",
    summary="One download's live progress (Server-Sent Events)",
    description=STREAM_DOC + " The stream ends after the final status.",
    response_class=EventSourceResponse,
    responses=error_responses(404, 422),
)
async def download_events(download_id: str, services: ServicesDep) -> EventSourceResponse:
    jobs = services.jobs
    await jobs.get(download_id)  # an unknown id is a 404, before the stream starts

    async def messages() -> AsyncIterator[dict]:
        # Subscribed inside the stream, not by the handler: a response whose client went
        # away before its first event never starts its generator, and would hold a
        # subscription that no ``finally`` releases. Subscribe before reading the state,
        # so no change between the two is lost.
        with jobs.events.subscribe(download_id) as subscription:
            current = await jobs.get(download_id)
            yield event_message(EventKind.STATUS, current)
            if current.job.state.finished:
                return
            async for message in _forward(subscription, stop_at_terminal=True):
                yield message

    return _stream(messages())


@router.get(
    "/events",
    summary="Every download's live progress (Server-Sent Events)",
    description=STREAM_DOC + " Opens with one status event per unfinished download.",
    response_class=EventSourceResponse,
    responses=error_responses(),
)
async def all_events(services: ServicesDep) -> EventSourceResponse:
    jobs = services.jobs

    async def messages() -> AsyncIterator[dict]:
        # Subscribed when the stream starts (see download_events); the subscription and the
        # opening state are taken together, with no await between them.
        with jobs.events.subscribe(None) as subscription:
            for view in jobs.unfinished():
                yield event_message(EventKind.STATUS, view)
            async for message in _forward(subscription, stop_at_terminal=False):
                yield message

    return _stream(messages())
