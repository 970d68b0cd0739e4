"""``GET /metrics``: Prometheus text, every value read from the live services at scrape time."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from modelhost.api.deps import Services, ServicesDep, require_api_key
from modelhost.api.errors import error_responses
from modelhost.mirror.stats import MirrorStats

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["health"])


class _ServicesCollector:
    """Reads counters off the job manager and sizes off the store; stores nothing itself."""

    def __init__(self, services: Services, cache_bytes: int, installed: int) -> None:
        self.services = services
        self.cache_bytes = cache_bytes
        self.installed = installed

    def collect(self) -> Iterator[Metric]:
        jobs = self.services.jobs
        yield CounterMetricFamily(
            "modelhost_download_requests",
            "Download requests since start",
            value=jobs.download_requests,
        )
        yield CounterMetricFamily(
            "modelhost_cache_hits",
            "Download requests answered from the cache since start",
            value=jobs.cache_hits,
        )
        yield CounterMetricFamily(
            "modelhost_bytes_transferred",
            "Bytes moved by finished transfers since start",
            value=jobs.bytes_transferred,
        )
        states = GaugeMetricFamily("modelhost_jobs", "Unfinished jobs by state", labels=["state"])
        states.add_metric(["downloading"], jobs.running_count)
        states.add_metric(["pending"], jobs.pending_count)
        yield states
        yield GaugeMetricFamily(
            "modelhost_event_streams",
            "Open progress streams (SSE subscriptions)",
            value=jobs.events.subscriber_count,
        )
        yield GaugeMetricFamily(
            "modelhost_cache_bytes", "Bytes in the blob store", value=self.cache_bytes
        )
        yield GaugeMetricFamily(
            "modelhost_models_installed", "Installed models", value=self.installed
        )
        yield from _mirror_metrics(self.services.mirror_stats)


def _mirror_metrics(stats: MirrorStats) -> Iterator[Metric]:
    """The Hugging Face mirror's counters (/hf; ``MirrorStats`` says what each counts)."""
    requests = CounterMetricFamily(
        "modelhost_mirror_requests",
        "Requests under /hf since start, by route kind and status",
        labels=["kind", "status"],
    )
    for (kind, status), count in sorted(stats.requests.items()):
        requests.add_metric([kind, str(status)], count)
    yield requests
    yield CounterMetricFamily(
        "modelhost_mirror_bytes_served",
        "File bytes the mirror's resolve answers sent since start",
        value=stats.bytes_served,
    )
    yield CounterMetricFamily(
        "modelhost_mirror_hits", "Mirror requests answered from the cache", value=stats.hits
    )
    yield CounterMetricFamily(
        "modelhost_mirror_misses",
        "Mirror requests for a repository, revision or file not installed",
        value=stats.misses,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **error_responses(),
    },
)
async def metrics(services: ServicesDep) -> Response:
    cache_bytes = await asyncio.to_thread(services.store.total_size)
    installed = len(await asyncio.to_thread(services.store.list))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ServicesCollector(services, cache_bytes, installed))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
