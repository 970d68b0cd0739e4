"""Sources turn a download request into a Plan. One module per source."""

from __future__ import annotations

from modelhost.errors import InvalidSource
from modelhost.sources.base import VALID_SOURCES, DownloadRequest, Plan, Source, SourceContext
from modelhost.sources.huggingface import HubSettings, HuggingFaceSource
from modelhost.sources.local import LocalSource
from modelhost.sources.torch_hub import TorchHubSource
from modelhost.sources.torchaudio import TorchaudioSource
from modelhost.sources.torchvision import TorchvisionSource
from modelhost.sources.tts_auto import TtsAutoSource
from modelhost.sources.url import UrlSource

_SOURCES: dict[str, type[Source]] = {
    "pytorch_hub": TorchHubSource,
    "torchvision": TorchvisionSource,
    "huggingface": HuggingFaceSource,
    "url": UrlSource,
    "tts_auto": TtsAutoSource,
    "torchaudio": TorchaudioSource,
    "local": LocalSource,
}


def get_source(name: str) -> Source:
    """The source called ``name``; raises ``InvalidSource`` with the API's message."""
    if name not in _SOURCES:
        raise InvalidSource(
            f"Invalid source. Must be one of: [{', '.join(VALID_SOURCES)}]",
            error=f"Invalid source: {name}",
        )
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
