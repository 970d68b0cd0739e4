"""Speech jobs in the state database (SQLAlchemy Core), beside the download jobs: the same
engine (``MODELHOST_DB_URL``, SQLite under ``MODELHOST_HOME`` by default), its own table."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine

from modelhost.jobs.db import _storage_errors
from modelhost.speechjobs.models import FINAL_STATES, SpeechJob, SpeechJobState, SpeechParams

log = logging.getLogger(__name__)

metadata = MetaData()

speech_jobs_table = Table(
    "speech_jobs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("model", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("params", JSON, nullable=False),
    Column("sentences", JSON, nullable=False),
    Column("sentences_total", Integer, nullable=False),
    Column("sentences_done", Integer, nullable=False, default=0),
    Column("message", Text, nullable=False, default=""),
    Column("error", Text),
    Column("sample_rate", Integer),
    Column("audio_bytes", Integer),
    Column("audio_samples", Integer),
    Column("resumed_from", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Index("ix_speech_jobs_state", "state"),
)

_TIMES = ("created_at", "updated_at", "started_at", "finished_at")
# Written once, by insert: a save (after every sentence) never rewrites the text.
_FIXED = ("id", "model", "params", "sentences", "sentences_total", "created_at")
# Every column but the text, for status and listings.
_SUMMARY = [c for c in speech_jobs_table.columns if c.name != "sentences"]


def _aware(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; every time modelhost stores is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _loaded(value: object) -> object:
    return json.loads(value) if isinstance(value, str) else value


def _to_job(row) -> SpeechJob:
    data = dict(row._mapping)
    return SpeechJob(
        id=data["id"],
        model=data["model"],
        state=SpeechJobState(data["state"]),
        params=SpeechParams.from_json(_loaded(data["params"])),
        sentences=tuple(_loaded(data["sentences"])) if "sentences" in data else (),
        sentences_total=data["sentences_total"],
        sentences_done=data["sentences_done"],
        message=data["message"] or "",
        error=data["error"],
        sample_rate=data["sample_rate"],
        audio_bytes=data["audio_bytes"],
        audio_samples=data["audio_samples"],
        resumed_from=data["resumed_from"],
        **{name: _aware(data[name]) for name in _TIMES},
    )


def _to_row(job: SpeechJob) -> dict:
    return {
        "id": job.id,
        "model": job.model,
        "state": job.state.value,
        "params": job.params.to_json(),
        "sentences": list(job.sentences),
        "sentences_total": job.sentences_total,
        "sentences_done": job.sentences_done,
        "message": job.message,
        "error": job.error,
        "sample_rate": job.sample_rate,
        "audio_bytes": job.audio_bytes,
        "audio_samples": job.audio_samples,
        "resumed_from": job.resumed_from,
        **{name: getattr(job, name) for name in _TIMES},
    }


class SpeechJobRepository:
    """Blocking CRUD on the speech_jobs table; callers run it in threads."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        with _storage_errors():
            metadata.create_all(engine)

    def insert(self, job: SpeechJob) -> None:
        with _storage_errors(), self.engine.begin() as conn:
            conn.execute(insert(speech_jobs_table).values(**_to_row(job)))

    def save(self, job: SpeechJob) -> bool:
        """Write the job's row unless the row is final (completed, failed, cancelled): a
        sentence that finishes after a cancel can never move the job back. Returns whether
        it wrote."""
        final = [state.value for state in FINAL_STATES]
        query = (
            update(speech_jobs_table)
            .where(speech_jobs_table.c.id == job.id, speech_jobs_table.c.state.not_in(final))
            .values(**{k: v for k, v in _to_row(job).items() if k not in _FIXED})
        )
        with _storage_errors(), self.engine.begin() as conn:
            written = conn.execute(query).rowcount
        if not written:
            log.debug("speech job %s: not saved as %s, its row is final", job.id, job.state.value)
        return bool(written)

    def get(self, job_id: str, sentences: bool = False) -> SpeechJob | None:
        """The job ``job_id``; its ``sentences`` too when asked (the runner)."""
        columns = speech_jobs_table.columns if sentences else _SUMMARY
        query = select(*columns).where(speech_jobs_table.c.id == job_id)
        with _storage_errors(), self.engine.connect() as conn:
            row = conn.execute(query).first()
        return _to_job(row) if row else None

    def list(
        self, states: tuple[SpeechJobState, ...] | None = None, limit: int = 100
    ) -> list[SpeechJob]:
        """Jobs without their sentences, newest first (oldest first when filtering for
        ``states``: the run order)."""
        table = speech_jobs_table
        if states is None:
            query = select(*_SUMMARY).order_by(table.c.created_at.desc(), table.c.id.desc())
        else:
            query = (
                select(*_SUMMARY)
                .where(table.c.state.in_([s.value for s in states]))
                .order_by(table.c.created_at.asc(), table.c.id.asc())
            )
        with _storage_errors(), self.engine.connect() as conn:
            return [_to_job(row) for row in conn.execute(query.limit(limit))]

    def states(self) -> dict[str, SpeechJobState]:
        """Every job's id and state."""
        query = select(speech_jobs_table.c.id, speech_jobs_table.c.state)
        with _storage_errors(), self.engine.connect() as conn:
            return {row.id: SpeechJobState(row.state) for row in conn.execute(query)}

    def delete(self, job_id: str) -> bool:
        """Remove the job's row; whether there was one."""
        query = delete(speech_jobs_table).where(speech_jobs_table.c.id == job_id)
        with _storage_errors(), self.engine.begin() as conn:
            return bool(conn.execute(query).rowcount)
