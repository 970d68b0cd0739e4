"""The job: one request to install one model, from ``pending`` to a final state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from modelhost.fetch.progress import FileSnapshot


class JobState(str, enum.Enum):
    PENDING = "pending"
    DOWNLOADING = "downloading"
    LOADING = "loading"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Job:
    """A persisted job row. Live progress of a running job is kept beside it in memory."""

    id: str
    key: str  # identical requests share a key, and so share the job
    name: str
    source: str
    model_id: str
    state: JobState
    message: str
    request: dict[str, Any]
    plan: dict[str, Any] | None = None
    error: str | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    bytes_transferred: int = 0
    force: bool = False
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None

    def evolve(self, **changes: Any) -> Job:
        return replace(self, updated_at=utcnow(), **changes)


@dataclass(frozen=True)
class JobView:
    """A job as the status endpoint and the progress streams show it, with live progress
    when it is running."""

    job: Job
    bytes_done: int
    bytes_total: int | None
    speed_bps: float | None
    eta_s: float | None
    # What the job is doing: planning, pending, downloading, verifying, converting,
    # committing, loading, or its final state.
    phase: str | None = None
    files: tuple[FileSnapshot, ...] = ()

    @property
    def progress_percent(self) -> float:
        if self.job.state == JobState.COMPLETED:
            return 100.0
        if not self.bytes_total:
            return 0.0
        return round(min(100.0, 100.0 * self.bytes_done / self.bytes_total), 1)
