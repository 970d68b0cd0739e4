"""Loaded models: loaders per family, devices and measured memory, the memory budget,
``optimize``, and inference (``synthesize`` for TTS, ``predict`` for the other tasks).

Everything here blocks; the API calls it from worker threads. Importing this package does
not import torch: the names below load their modules on first use.

- ``ModelRegistry`` (``registry``): load / unload / get / list / pin under a budget.
- ``load`` (``loaders``), ``detect_family`` / ``Family`` (``families``), ``LoadedModel``.
- ``synthesize`` / ``predict`` (``inference``), ``Audio`` / ``to_wav_bytes`` /
  ``parse_wav`` (``wav``); ``OptimizeReport`` here, and ``optimize`` itself from
  ``modelhost.runtime.optimize`` (the submodule has the function's name).
- ``resolve_device`` (``device``), errors in ``runtime.errors``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelRegistry": "registry",
    "UnloadReport": "registry",
    "load": "loaders",
    "detect_family": "families",
    "Family": "families",
    "LoadedModel": "loaded",
    "synthesize": "inference",
    "predict": "inference",
    "Audio": "wav",
    "to_wav_bytes": "wav",
    "parse_wav": "wav",
    "OptimizeReport": "optimize",
    "resolve_device": "device",
    "default_speaker_embedding": "speaker",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'modelhost.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"modelhost.runtime.{module}"), name)
