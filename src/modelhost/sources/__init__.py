"""Sources turn a download request into a Plan. One module per source."""

from __future__ import annotations

import difflib

from modelhost.errors import InvalidSource
from modelhost.sources.base import VALID_SOURCES, DownloadRequest, Plan, Source, SourceContext
from modelhost.sources.huggingface import HubSettings
from modelhost.sources.registry import CONCRETE_SOURCES
from modelhost.sources.tts_auto import TtsAutoSource

# The concrete sources and tts_auto, which resolves to one of them.
_SOURCES: dict[str, type[Source]] = {**CONCRETE_SOURCES, "tts_auto": TtsAutoSource}


def get_source(name: str) -> Source:
    """The source called ``name``; raises ``InvalidSource`` with the API's message, which
    names the closest source when ``name`` looks like a typo of one."""
    if name not in _SOURCES:
        choices = f"Must be one of: [{', '.join(VALID_SOURCES)}]"
        close = difflib.get_close_matches(name.lower(), VALID_SOURCES, n=1)
        # A typo gets the suggestion first: it is the line the user needs.
        message = (
            f"unknown source {name!r}: did you mean {close[0]!r}? {choices}"
            if close
            else f"Invalid source. {choices}"
        )
        raise InvalidSource(message, error=f"Invalid source: {name}", param="source")
    return _SOURCES[name]()


__all__ = [
    "HubSettings",
    "VALID_SOURCES",
    "DownloadRequest",
    "Plan",
    "Source",
    "SourceContext",
    "get_source",
]
