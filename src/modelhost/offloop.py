"""Import a heavy module (torch, transformers, numpy, PyAV behind it) without blocking the
event loop.

The first import of ``modelhost.runtime.inference`` takes seconds of CPU and holds the GIL and
the import lock; done in a request handler it froze ``/health``, status and SSE for all of it,
even for a request that then answered 409. Handlers ``await import_off_loop(name)`` instead: a
module already imported is returned at once, otherwise it is imported in a thread. A module
another thread is still importing (the warm-up) is waited for in a thread too, never on the
loop. Imports nothing of modelhost's, so every layer may use it.

``import_whole`` is the one way into the heavy runtime from threads (the warm-up, job
threads loading models, request threads): the first import of a module happens in one
thread at a time. transformers puts its lazy module in ``sys.modules`` before its first
import ends, and a second thread importing it meanwhile got a module without its classes
(three concurrent first loads: "module 'transformers' has no attribute 'BarkModel'").
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import threading
from types import ModuleType

# Held while a first import runs; reentrant, as a module imported here may import another
# through import_whole. _WHOLE: the names whose import ended under it.
_FIRST_IMPORT = threading.RLock()
_WHOLE: set[str] = set()


def _ready(name: str) -> ModuleType | None:
    """``name`` when it is fully imported, else None (absent or still initialising)."""
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    if module is None or getattr(spec, "_initializing", False):
        return None
    return module


def import_whole(name: str) -> ModuleType:
    """The module ``name`` once its import has ended, imported by one thread at a time
    (blocks: call it from a thread, or through ``import_off_loop``)."""
    if name in _WHOLE:
        return sys.modules[name]
    with _FIRST_IMPORT:
        module = importlib.import_module(name)
        _WHOLE.add(name)
        return module


async def import_off_loop(name: str) -> ModuleType:
    """The module ``name``, imported in a thread unless it is already."""
    if name in _WHOLE:
        return sys.modules[name]
    return await asyncio.to_thread(import_whole, name)
