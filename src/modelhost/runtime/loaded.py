"""A model resident in memory, with what was measured about it.

``LoadedModel`` is data: its objects, the facts about its family that ``loaders.load``
resolved when it loaded it (``family``, ``task``, ``is_tts``), measured memory, and the
bookkeeping of its use. It looks nothing up in the family registry.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from modelhost.runtime.batching import BatchSettings, BatchStats
from modelhost.runtime.families.vocabulary import Family, family_name
from modelhost.units import MB, NEVER

# MODELHOST_MAX_INPUT_CHARS's default (config.py): what a model loaded outside a server takes.
DEFAULT_MAX_TEXT_CHARS = 4096

if TYPE_CHECKING:  # annotations only: the server starts without torch
    from torch import nn

_use_counter = itertools.count(1)


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(eq=False)
class LoadedModel:
    """One loaded model: its objects, measured memory, and use bookkeeping.

    ``allocated_bytes`` / ``reserved_bytes`` are measured: on CUDA (and MPS) the allocator's
    growth across the load, on CPU the bytes of parameters and buffers (CPU has no caching
    allocator, so reserved equals allocated). On CUDA the allocator's figure is at least
    ``weights_bytes``: it rounds each block up to 512 bytes and keeps the unsplit remainder
    (up to 1 MiB) of a large free block it reuses. ``weights_bytes`` is always the parameter
    and buffer bytes. ``lock`` serialises inference and optimisation on this model.
    """

    name: str
    family: Family | str  # a built-in ``Family``, or a registered adapter's name
    task: str
    device: str
    model: nn.Module | None
    # Whether its family synthesizes speech (its adapter has ``synthesize``), resolved by
    # the loader from the adapter at load time.
    is_tts: bool = False
    processor: Any = None
    vocoder: nn.Module | None = None
    sample_rate: int | None = None
    parameters: int = 0
    allocated_bytes: int = 0
    reserved_bytes: int = 0
    weights_bytes: int = 0
    estimated_bytes: int = 0
    load_seconds: float = 0.0
    optimized: bool = False
    optimization: dict[str, Any] | None = None
    pinned: bool = False
    # The longest text input one request may give it (MODELHOST_MAX_INPUT_CHARS; the
    # registry sets it at load): text inputs beyond it are refused before they run.
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    extra: dict[str, Any] = field(default_factory=dict)
    loaded_at: datetime = field(default_factory=_now)
    last_used: datetime = field(default_factory=_now)
    use_seq: int = field(default_factory=lambda: next(_use_counter))
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    # Lifecycle bookkeeping (``runtime.lifecycle``): requests in flight, the operation
    # running on it (``optimizing``), and whether it is being unloaded (no new requests).
    inflight: int = 0
    operation: str | None = None
    retired: bool = False
    # Idle unload (``lifecycle``): seconds it stays loaded once idle (NEVER: -1), when its
    # last request ended (``time.monotonic``), and which load of its name this is (1 = the
    # first since the server started).
    keep_alive_s: float = NEVER
    idle_since: float = field(default_factory=time.monotonic)
    load_count: int = 1
    _idle: threading.Condition = field(default_factory=threading.Condition, repr=False)
    # How concurrent requests are coalesced (runtime.batching), and what its worker ran.
    batching: BatchSettings = field(default_factory=BatchSettings)
    batch_stats: BatchStats = field(default_factory=BatchStats, repr=False)

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def touch(self) -> None:
        """Mark the model as just used (the LRU order eviction follows)."""
        self.last_used = _now()
        self.use_seq = next(_use_counter)

    def enter(self, operation: str | None = None) -> bool:
        """Count one request (or ``operation``) in flight; False once the model is retired
        (being unloaded or deleted), so the caller refuses the request instead."""
        with self._idle:
            if self.retired or self.model is None:
                return False
            self.inflight += 1
            if operation is not None:
                self.operation = operation
            return True

    def leave(self, operation: str | None = None) -> None:
        """The end of what ``enter`` counted; wakes an unload waiting for the model idle."""
        with self._idle:
            self.inflight -= 1
            if operation is not None and self.operation == operation:
                self.operation = None
            if self.inflight == 0:
                self.idle_since = time.monotonic()  # keep-alive counts from here
            self._idle.notify_all()

    def set_keep_alive(self, seconds: float) -> None:
        """Keep the model ``seconds`` once idle from now on (NEVER: -1); the idle time
        starts again now (a request asking for a keep-alive is a use)."""
        with self._idle:
            self.keep_alive_s = seconds
            self.idle_since = time.monotonic()

    def expires_at(self) -> float | None:
        """When (``time.monotonic``) the model is to be unloaded for being idle: None while
        requests are in flight, or when it is pinned or kept for ever."""
        with self._idle:
            if self.pinned or self.keep_alive_s < 0 or self.inflight or self.retired:
                return None
            return self.idle_since + self.keep_alive_s

    def retire_if_expired(self, now: float) -> bool:
        """Retire (refuse new requests) only if the model has been idle past its keep-alive
        at ``now``, checked under the same lock ``enter`` takes: a request that got in
        first keeps it loaded."""
        with self._idle:
            if self.pinned or self.keep_alive_s < 0 or self.inflight or self.retired:
                return False
            if self.idle_since + self.keep_alive_s > now:
                return False
            self.retired = True
            return True

    def keep_alive_view(self) -> dict[str, Any]:
        """``load_count``, ``idle_s`` (null while in use), ``keep_alive_s`` (-1: never) and
        ``unloads_in_s`` / ``expires_at`` (null when it is not due to be unloaded)."""
        now = time.monotonic()
        with self._idle:
            in_use = self.inflight > 0
            idle_s = None if in_use else round(now - self.idle_since, 3)
        due = self.expires_at()
        unloads_in = None if due is None else max(0.0, due - now)
        return {
            "load_count": self.load_count,
            "idle_s": idle_s,
            "keep_alive_s": NEVER if self.keep_alive_s < 0 else self.keep_alive_s,
            "unloads_in_s": None if unloads_in is None else round(unloads_in, 3),
            "expires_at": None
            if unloads_in is None
            else datetime.fromtimestamp(time.time() + unloads_in, timezone.utc).isoformat(),
        }

    def retire(self) -> None:
        """Refuse new requests from now on (requests in flight go on)."""
        with self._idle:
            self.retired = True

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the requests in flight to finish; True when none is."""
        with self._idle:
            return self._idle.wait_for(lambda: self.inflight == 0, timeout=timeout_s)

    def memory_usage(self) -> dict[str, float]:
        """``allocated_mb`` / ``reserved_mb`` as the managed-models view reports them."""
        return {
            "allocated_mb": round(self.allocated_bytes / MB, 3),
            "reserved_mb": round(self.reserved_bytes / MB, 3),
        }

    def describe(self, queued: int = 0) -> dict[str, Any]:
        """The model's row for ``GET /models/managed`` (documented fields, then the rest).
        ``queued``: the requests waiting on its worker, which the lifecycle's ``workers``
        count (``ModelLifecycle.describe`` passes it)."""
        return {
            "name": self.name,
            "loaded": self.loaded,
            "device": self.device,
            "is_tts": self.is_tts,
            "optimized": self.optimized,
            "memory_usage": self.memory_usage(),
            "parameters": self.parameters,
            "family": family_name(self.family),
            "task": self.task,
            "pinned": self.pinned,
            "sample_rate": self.sample_rate,
            "has_vocoder": self.vocoder is not None,
            "estimated_mb": round(self.estimated_bytes / MB, 3),
            "load_seconds": round(self.load_seconds, 3),
            "loaded_at": self.loaded_at.isoformat(),
            "last_used": self.last_used.isoformat(),
            "optimization": self.optimization,
            "inflight": self.inflight,
            "operation": self.operation,
            **self.keep_alive_view(),
            **self.batching.describe(),
            **self.batch_stats.describe(queued),
        }

    def release(self) -> None:
        """Drop the model's objects (the registry then frees the device memory)."""
        self.model = None
        self.vocoder = None
        self.processor = None
