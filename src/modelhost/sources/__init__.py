"""Sources turn a download request into a Plan. One module per source."""

from __future__ import annotations

from modelhost.errors import InvalidSource, NotImplementedYet
from modelhost.sources.base import DownloadRequest, Plan, Source, SourceContext
from modelhost.sources.huggingface import HubSettings, HuggingFaceSource
from modelhost.sources.torch_hub import TorchHubSource
from modelhost.sources.torchvision import TorchvisionSource
from modelhost.sources.tts_auto import TtsAutoSource
from modelhost.sources.url import UrlSource

# The seed's order, plus torchaudio (its Tacotron2 entry names that source).
VALID_SOURCES = ("pytorch_hub", "torchvision", "huggingface", "url", "tts_auto", "torchaudio")

_NOT_BUILT = {
    "torchaudio": "issue #5 (remaining sources)",
}


class _NotBuiltSource:
    def __init__(self, name: str) -> None:
        self.name = name

    def plan(self, request: DownloadRequest, context: SourceContext) -> Plan:
        raise NotImplementedYet(
            f"The '{self.name}' source is not built yet ({_NOT_BUILT[self.name]}). "
            "Meanwhile use source 'url' with a direct link to a weights file.",
            error=f"Source not implemented: {self.name}",
        )


def get_source(name: str) -> Source:
    """The source called ``name``; raises ``InvalidSource`` with the seed's message."""
    if name not in VALID_SOURCES:
        raise InvalidSource(
            f"Invalid source. Must be one of: [{', '.join(VALID_SOURCES)}]",
            error=f"Invalid source: {name}",
        )
    if name == "url":
        return UrlSource()
    if name == "huggingface":
        return HuggingFaceSource()
    if name == "torchvision":
        return TorchvisionSource()
    if name == "tts_auto":
        return TtsAutoSource()
    if name == "pytorch_hub":
        return TorchHubSource()
    return _NotBuiltSource(name)


__all__ = [
    "HubSettings",
    "VALID_SOURCES",
    "DownloadRequest",
    "Plan",
    "Source",
    "SourceContext",
    "get_source",
]
