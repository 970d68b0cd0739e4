"""Job persistence through SQLAlchemy Core: SQLite by default, any SQLAlchemy URL works."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from modelhost.errors import DISK_FULL_ERRNOS, InsufficientStorage
from modelhost.jobs.models import Job, JobState

log = logging.getLogger(__name__)

metadata = MetaData()

jobs_table = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("key", String(64), nullable=False),
    Column("name", String(128), nullable=False),
    Column("source", String(32), nullable=False),
    Column("model_id", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("message", Text, nullable=False, default=""),
    Column("error", Text),
    Column("request", JSON, nullable=False),
    Column("plan", JSON),
    Column("bytes_done", Integer, nullable=False, default=0),
    Column("bytes_total", Integer),
    Column("bytes_transferred", Integer, nullable=False, default=0),
    Column("force", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Index("ix_jobs_state", "state"),
    Index("ix_jobs_name", "name"),
)

_COLUMNS = [c.name for c in jobs_table.columns]


def _aware(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; every time modelhost stores is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _to_job(row) -> Job:
    data = dict(row._mapping)
    data["state"] = JobState(data["state"])
    for name in ("created_at", "updated_at", "started_at", "finished_at"):
        data[name] = _aware(data[name])
    if isinstance(data["request"], str):
        data["request"] = json.loads(data["request"])
    return Job(**data)


def _to_row(job: Job) -> dict:
    row = {name: getattr(job, name) for name in _COLUMNS}
    row["state"] = job.state.value
    return row


def _is_disk_full(exc: OperationalError) -> bool:
    """SQLite says SQLITE_FULL as "database or disk is full"; other drivers carry ENOSPC."""
    original = exc.orig
    if isinstance(original, OSError) and original.errno in DISK_FULL_ERRNOS:
        return True
    text = str(original).lower()
    return "disk is full" in text or "no space left" in text or "disk full" in text


@contextmanager
def _storage_errors() -> Iterator[None]:
    """Turn the database's "disk full" into ``InsufficientStorage`` (507), in this one place,
    so that every caller (API handlers, the job manager) answers it as storage, not as a bug."""
    try:
        yield
    except OperationalError as exc:
        if not _is_disk_full(exc):
            raise
        raise InsufficientStorage(
            f"The state database cannot be written: its disk is full ({exc.orig}); free disk "
            "space where MODELHOST_DB_URL / MODELHOST_HOME point, then retry",
            error="Insufficient storage",
        ) from exc


class JobRepository:
    """Blocking CRUD on the jobs table; the job manager calls it from worker threads."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = self._make_engine(url)
        with _storage_errors():
            metadata.create_all(self.engine)

    @staticmethod
    def _make_engine(url: str) -> Engine:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_connection, _record) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.close()

            return engine
        return create_engine(url, pool_pre_ping=True)

    def insert(self, job: Job) -> None:
        with _storage_errors(), self.engine.begin() as conn:
            conn.execute(insert(jobs_table).values(**_to_row(job)))

    def save(self, job: Job) -> bool:
        """Write the job's row, unless the row is in a final state: completed, failed and
        cancelled are final, so a late write (a transfer thread's progress flush that lost
        the race with the job's end) can never move a job back. Returns whether it wrote."""
        final = [state.value for state in JobState if state.finished]
        query = (
            update(jobs_table)
            .where(jobs_table.c.id == job.id, jobs_table.c.state.not_in(final))
            .values(**_to_row(job))
        )
        with _storage_errors(), self.engine.begin() as conn:
            written = conn.execute(query).rowcount
        if not written:
            log.debug("job %s: not saved as %s, its row is final", job.id, job.state.value)
        return bool(written)

    def get(self, job_id: str) -> Job | None:
        with _storage_errors(), self.engine.connect() as conn:
            row = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).first()
        return _to_job(row) if row else None

    def list(
        self, states: Iterable[JobState] | None = None, name: str | None = None, limit: int = 500
    ) -> list[Job]:
        """Jobs, newest first, optionally filtered by state and model name."""
        query = select(jobs_table).order_by(jobs_table.c.created_at.desc()).limit(limit)
        if states is not None:
            query = query.where(jobs_table.c.state.in_([s.value for s in states]))
        if name is not None:
            query = query.where(jobs_table.c.name == name)
        with _storage_errors(), self.engine.connect() as conn:
            return [_to_job(row) for row in conn.execute(query)]

    def close(self) -> None:
        self.engine.dispose()
