"""OpenAI-compatible /v1 route module: speech_jobs (not built yet)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from modelhost.api.deps import require_api_key

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])
