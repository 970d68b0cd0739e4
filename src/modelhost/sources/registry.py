"""The sources that plan a request themselves, by name.

``tts_auto`` is not one of them: it resolves a catalog name to an entry and lets the entry's
own source (one of these) plan it. Keeping that list here, apart from ``get_source`` in the
package, lets ``tts_auto`` look a source up without importing the package that imports it.
"""

from __future__ import annotations

from modelhost.sources.base import Source
from modelhost.sources.huggingface import HuggingFaceSource
from modelhost.sources.local import LocalSource
from modelhost.sources.torch_hub import TorchHubSource
from modelhost.sources.torchaudio import TorchaudioSource
from modelhost.sources.torchvision import TorchvisionSource
from modelhost.sources.url import UrlSource

CONCRETE_SOURCES: dict[str, type[Source]] = {
    "pytorch_hub": TorchHubSource,
    "torchvision": TorchvisionSource,
    "huggingface": HuggingFaceSource,
    "url": UrlSource,
    "torchaudio": TorchaudioSource,
    "local": LocalSource,
}


def concrete_source(name: str) -> Source:
    """The source called ``name`` among those that plan themselves (a catalog entry's)."""
    return CONCRETE_SOURCES[name]()
