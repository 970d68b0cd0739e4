"""OpenAI-compatible routes under ``/v1``: what OpenAI's clients and SDKs call.

One module per resource, each with its own ``router``; errors on ``/v1`` paths take OpenAI's
shape (``api/openai/errors.py``), and the API key is the same ``MODELHOST_API_KEY``, sent
as OpenAI clients send it (``Authorization: Bearer``).
"""

from __future__ import annotations

from fastapi import APIRouter


def routers() -> list[APIRouter]:
    """Every /v1 router, in the order the app includes them."""
    # Imported here, not at the top: api/errors.py imports this package's errors module,
    # and the route modules import api/errors.py.
    from modelhost.api.openai import embeddings, models, speech, speech_jobs, transcriptions

    return [m.router for m in (models, speech, speech_jobs, transcriptions, embeddings)]
