"""The /v1 routers, in the order the app includes them."""

from __future__ import annotations

from fastapi import APIRouter

from modelhost.api.openai import embeddings, models, speech, speech_jobs, transcriptions


def routers() -> list[APIRouter]:
    """Every /v1 resource router, in the order the app includes them (the voices router,
    ``voices.router``, is included by the app on its own)."""
    return [m.router for m in (models, speech, speech_jobs, transcriptions, embeddings)]
