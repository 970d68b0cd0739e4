"""The family adapters, in the order ``detect_family`` asks them.

Each built-in family is one line of ``BUILTIN``: ``"module:attribute"``, imported on first
use (like vLLM's model registry), so importing this module imports no adapter, torch or
Transformers. A family added at run time (``register``) or named in the environment
variable ``MODELHOST_FAMILIES`` (comma-separated ``module:attribute`` entries, read on first
use) is asked before the built-ins, so it can claim models they would refuse::

    from modelhost.runtime.families.registry import register
    register("my_package.my_family:MyAdapter")  # or register(MyAdapter())
"""

from __future__ import annotations

import importlib
import os
import threading

from modelhost.runtime.errors import UnsupportedModel
from modelhost.runtime.families.base import FamilyAdapter
from modelhost.runtime.families.vocabulary import family_name

# Order matters: the load_as families first (a url/torchaudio/torch_hub install says what
# it loads as), then the architectures that decide their task, then the task families.
# Whole literals, not joined from a prefix: each line says what it imports, to a reader, to
# grep, and to tests/test_import_cycles.py, which counts each as an import.
BUILTIN: tuple[str, ...] = (
    "modelhost.runtime.families.torchscript:TorchScriptAdapter",
    "modelhost.runtime.families.torch_hub:TorchHubAdapter",
    "modelhost.runtime.families.tacotron2:Tacotron2Adapter",
    "modelhost.runtime.families.torchvision:TorchvisionAdapter",
    "modelhost.runtime.families.speecht5:SpeechT5Adapter",
    "modelhost.runtime.families.bark:BarkAdapter",
    "modelhost.runtime.families.vits:VitsAdapter",
    "modelhost.runtime.families.whisper:WhisperAdapter",
    "modelhost.runtime.families.text_classification:TextClassificationAdapter",
    "modelhost.runtime.families.feature_extraction:FeatureExtractionAdapter",
    "modelhost.runtime.families.text2text:Text2TextAdapter",
    "modelhost.runtime.families.text_generation:TextGenerationAdapter",
    "modelhost.runtime.families.image_classification:ImageClassificationAdapter",
)
ENV_VAR = "MODELHOST_FAMILIES"

_lock = threading.Lock()
_registered: list[FamilyAdapter] = []  # register()ed, newest first
_resolved: list[FamilyAdapter] | None = None
_resolved_env: str | None = None  # the MODELHOST_FAMILIES value _resolved was built from


def _resolve(entry: str) -> FamilyAdapter:
    """The adapter ``module:attribute`` names (a class is instantiated)."""
    module_name, _, attribute = entry.strip().partition(":")
    if not module_name or not attribute:
        raise ValueError(f"a family entry is 'module:attribute', got {entry!r}")
    found = getattr(importlib.import_module(module_name), attribute)
    adapter = found() if isinstance(found, type) else found
    if not isinstance(adapter, FamilyAdapter) or not adapter.name:
        raise TypeError(f"{entry} is not a FamilyAdapter with a name")
    return adapter


def register(adapter: FamilyAdapter | str) -> FamilyAdapter:
    """Add a family (an adapter, or its ``"module:attribute"``), asked before every family
    registered earlier and the built-ins. A family of the same name is replaced."""
    global _resolved
    resolved = _resolve(adapter) if isinstance(adapter, str) else adapter
    with _lock:
        _registered[:] = [a for a in _registered if a.name != resolved.name]
        _registered.insert(0, resolved)
        _resolved = None
    return resolved


def unregister(name: str) -> None:
    """Remove a family added with ``register`` (built-ins stay)."""
    global _resolved
    with _lock:
        _registered[:] = [a for a in _registered if a.name != name]
        _resolved = None


def adapters() -> list[FamilyAdapter]:
    """Every family in detection order: registered, then ``MODELHOST_FAMILIES``, then
    ``BUILTIN``. The first call imports the adapter modules (none of them imports torch)."""
    global _resolved, _resolved_env
    env = os.environ.get(ENV_VAR, "")
    with _lock:
        if _resolved is None or env != _resolved_env:
            found = [*_registered, *(_resolve(e) for e in env.split(",") if e.strip())]
            names = {a.name for a in found}
            found += [a for a in map(_resolve, BUILTIN) if a.name not in names]
            _resolved, _resolved_env = found, env
        return list(_resolved)


def adapter_for(family: object) -> FamilyAdapter:
    """The adapter of a family (a ``Family`` member or an adapter's name)."""
    name = family_name(family)  # type: ignore[arg-type]
    for adapter in adapters():
        if adapter.name == name:
            return adapter
    raise UnsupportedModel(f"no model family {name!r} is registered")
