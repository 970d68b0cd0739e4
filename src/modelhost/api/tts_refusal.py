"""The refusal of speech asked of a model that cannot speak, for ``/synthesize`` and
``/v1/audio/speech``: it names the model's task and lists the installed models that can
speak, so a client learns what to ask for instead."""

from __future__ import annotations

import asyncio

from modelhost.api.deps import Services
from modelhost.catalog import speaks
from modelhost.errors import NotTextToSpeech


async def not_tts(
    services: Services, name: str, task: str, hint: str = "", param: str | None = None
) -> NotTextToSpeech:
    """The error to raise for ``name`` (a loaded ``task`` model) asked to speak."""
    manifests = await asyncio.to_thread(services.store.list)
    installed = sorted(manifest.name for manifest in manifests if speaks(manifest))
    return NotTextToSpeech(name, task, installed, hint=hint, param=param)
