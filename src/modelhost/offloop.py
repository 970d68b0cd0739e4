"""Import a heavy module (torch, transformers, numpy, PyAV behind it) without blocking the
event loop.

The first import of ``modelhost.runtime.inference`` takes seconds of CPU and holds the GIL and
the import lock; done in a request handler it froze ``/health``, status and SSE for all of it,
even for a request that then answered 409. Handlers ``await import_off_loop(name)`` instead: a
module already imported is returned at once, otherwise it is imported in a thread. A module
another thread is still importing (the warm-up) is waited for in a thread too, never on the
loop. Imports nothing of modelhost's, so every layer may use it.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from types import ModuleType


def _ready(name: str) -> ModuleType | None:
    """``name`` when it is fully imported, else None (absent or still initialising)."""
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    if module is None or getattr(spec, "_initializing", False):
        return None
    return module


async def import_off_loop(name: str) -> ModuleType:
    """The module ``name``, imported in a thread unless it is already."""
    return _ready(name) or await asyncio.to_thread(importlib.import_module, name)
