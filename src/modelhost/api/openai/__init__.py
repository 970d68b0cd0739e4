"""OpenAI-compatible routes under ``/v1``: what OpenAI's clients and SDKs call.

One module per resource, each with its own ``router``; errors on ``/v1`` paths take OpenAI's
shape (``api/openai/errors.py``), and the API key is the same ``MODELHOST_API_KEY``, sent
as OpenAI clients send it (``Authorization: Bearer``).
"""

from __future__ import annotations

from fastapi import APIRouter


def routers() -> list[APIRouter]:
    """Every router of this package, in the order the app includes them: the /v1 routes,
    then ``GET /models/{name}/voices`` (modelhost's own path for the speech API's voices)."""
    # Imported here, not at the top: api/errors.py imports this package's errors module, and
    # route modules import api/errors.py (error_responses) and api/inference.py.
    from modelhost.api.openai import (
        embeddings,
        models,
        speech,
        speech_jobs,
        transcriptions,
        voices,
    )

    routes = [m.router for m in (models, speech, speech_jobs, transcriptions, embeddings, voices)]
    return [*routes, voices.models_router]
