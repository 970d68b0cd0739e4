"""The speech job: one long text to speak, from ``pending`` to a final state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any


class SpeechJobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Completed, failed and cancelled are final: a job never leaves them."""
        return self in (SpeechJobState.COMPLETED, SpeechJobState.FAILED, SpeechJobState.CANCELLED)


FINAL_STATES = tuple(s for s in SpeechJobState if s.finished)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class SpeechParams:
    """What every sentence of a job is spoken with (the request body less model and input).

    ``seed`` is always set: one is drawn at submission when the request has none, so a
    resumed job speaks its remaining sentences as an uninterrupted run would have."""

    voice: Any
    response_format: str
    speed: float
    seed: int
    instructions: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "voice": self.voice,
            "response_format": self.response_format,
            "speed": self.speed,
            "seed": self.seed,
            "instructions": self.instructions,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SpeechParams:
        return cls(
            voice=data.get("voice"),
            response_format=str(data["response_format"]),
            speed=float(data["speed"]),
            seed=int(data["seed"]),
            instructions=data.get("instructions"),
        )


@dataclass(frozen=True)
class SpeechJob:
    """A persisted speech job row."""

    id: str
    model: str
    state: SpeechJobState
    params: SpeechParams
    # The text, split: read from the database only where it is spoken (the runner); status
    # and listings read ``sentences_total`` alone, however long the text.
    sentences: tuple[str, ...] = ()
    sentences_total: int = 0
    sentences_done: int = 0
    message: str = ""
    error: str | None = None
    sample_rate: int | None = None
    audio_bytes: int | None = None  # the encoded result's size, once completed
    audio_samples: int | None = None
    # Sentences already on disk when the job was last resumed after a restart (None: never).
    resumed_from: int | None = None
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.sentences and self.sentences_total != len(self.sentences):
            object.__setattr__(self, "sentences_total", len(self.sentences))

    def evolve(self, **changes: Any) -> SpeechJob:
        """A copy with ``changes`` and a new ``updated_at``."""
        return replace(self, updated_at=utcnow(), **changes)
