"""The loaded models of one server: load, unload, pin, and a memory budget with LRU eviction.

The budget has two parts:

- ``max_loaded``: at most this many models resident (``MODELHOST_MAX_LOADED``).
- memory per device: on CUDA ``gpu_memory_fraction`` of the GPU's total memory, on CPU
  ``cpu_memory_bytes`` when set. Before a load, the model's need is estimated from its
  stored weights (``weights.estimate_bytes``) and from the architecture its config.json
  declares (built on the meta device), the larger of the two, and added to the measured
  ``allocated_bytes`` of the models already on that device. With no CPU budget set, a model
  needing more than the machine's physical memory is still refused.

When the new model does not fit, least-recently-used unpinned models are unloaded until it
does. When even that is not enough (pinned models are in the way, or the model alone is
over the budget), nothing is unloaded and ``MemoryBudgetExceeded`` names what would have to
go. Each model has its own lock: loading or unloading one model never waits for another's
load (only loads onto the same accelerator take turns, which keeps CUDA allocator deltas
attributable). The budget is decided under one short lock, counting the loads still in
progress; ``get`` and ``list`` never wait for a load. Unloading (and evicting) a model
refuses new requests to it, waits up to ``drain_timeout_s`` for those in flight, then frees
it: a request still queued then fails cleanly with ``ModelNotLoaded``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from modelhost.errors import Conflict
from modelhost.offloop import import_whole
from modelhost.runtime.device import device_str, resolve_device
from modelhost.runtime.errors import MemoryBudgetExceeded, ModelNotLoaded
from modelhost.runtime.loaded import DEFAULT_MAX_TEXT_CHARS, MB, LoadedModel
from modelhost.runtime.memory import (
    device_total_bytes,
    physical_memory_bytes,
    read_allocator,
    release_cached,
)
from modelhost.store.manifest import Manifest
from modelhost.units import GB

if TYPE_CHECKING:  # the loaders import torch and transformers: on first load, not at startup
    import torch

    from modelhost.runtime.loaders import Preflight

# The loaders import torch and transformers; imported by one thread at a time (import_whole):
# concurrent first loads otherwise saw a half-imported transformers.
LOADERS = "modelhost.runtime.loaders"


# Models are built (on the meta device to size them, then loaded) by one thread at a time:
# two loads at once in one process left one model's tensors on the meta device ("Cannot copy
# out of meta tensor"), as torch's and transformers' construction contexts are not safe to
# interleave across threads. On a CPU, parallel loads gained little anyway (the GIL).
_CONSTRUCTION = threading.Lock()


def _loaders() -> ModuleType:
    """``runtime.loaders`` with transformers (which its families import when they load)
    wholly imported first."""
    import_whole("transformers")
    return import_whole(LOADERS)

Loader = Callable[[Manifest, Path, "torch.device", bool], LoadedModel]


def load_on_first_use(
    manifest: Manifest,
    path: Path,
    device: torch.device,
    allow_pickle: bool,
    gpu_stream: bool = True,
) -> LoadedModel:
    """The default loader, ``loaders.load``, imported by the first load (torch and
    transformers with it), not when the server starts."""
    load = _loaders().load
    with _CONSTRUCTION:
        return load(manifest, path, device, allow_pickle, gpu_stream)


DRAIN_TIMEOUT_S = 30.0  # how long an unload waits for the requests in flight


@dataclass(frozen=True)
class _Reservation:
    """A load in progress: the budget it holds until its model is resident."""

    device: str
    need_bytes: int


@dataclass(frozen=True)
class UnloadReport:
    """What unloading freed: the model's measured bytes, and the allocator afterwards."""

    name: str
    device: str
    freed_bytes: int
    allocated_after: int  # the device allocator's allocated bytes after (0 on CPU)
    reserved_after: int
    evicted: bool = False  # unloaded to make room for another model

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "device": self.device,
            "freed_mb": round(self.freed_bytes / MB, 3),
            "allocated_mb_after": round(self.allocated_after / MB, 3),
            "reserved_mb_after": round(self.reserved_after / MB, 3),
            "evicted": self.evicted,
        }


def _names(models: list[LoadedModel]) -> str:
    return ", ".join(f"'{m.name}' ({m.allocated_bytes / MB:.1f} MB)" for m in models)


class ModelRegistry:
    """Thread-safe set of loaded models under a count and memory budget."""

    def __init__(
        self,
        max_loaded: int | None = None,
        gpu_memory_fraction: float = 0.9,
        device_setting: str = "auto",
        cpu_memory_bytes: int | None = None,
        loader: Loader | None = None,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        gpu_stream: bool = True,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    ) -> None:
        if max_loaded is not None and max_loaded < 1:
            raise ValueError("max_loaded must be at least 1 (or None for no limit)")
        if not 0.0 < gpu_memory_fraction <= 1.0:
            raise ValueError("gpu_memory_fraction must be in (0, 1]")
        self.max_loaded = max_loaded
        self.gpu_memory_fraction = gpu_memory_fraction
        self.device_setting = device_setting
        self.cpu_memory_bytes = cpu_memory_bytes
        # gpu_stream (MODELHOST_GPU_STREAM): CUDA loads stream safetensors onto the GPU.
        self._loader: Loader = loader or partial(load_on_first_use, gpu_stream=gpu_stream)
        self._models: dict[str, LoadedModel] = {}
        self.drain_timeout_s = drain_timeout_s
        self.max_text_chars = max_text_chars  # MODELHOST_MAX_INPUT_CHARS, given to each model
        self._lock = threading.RLock()  # guards the dicts below and the budget; held briefly
        self._loading: dict[str, _Reservation] = {}  # loads in progress
        self._name_locks: dict[str, threading.Lock] = {}  # one load / unload per model
        self._device_locks: dict[str, threading.Lock] = {}  # accelerator loads take turns

    # ------------------------------------------------------------------ queries

    def get(self, name: str, touch: bool = True) -> LoadedModel:
        """The loaded model ``name`` (marked used), or ``ModelNotLoaded``."""
        with self._lock:
            model = self._models.get(name)
        if model is None:
            raise ModelNotLoaded(
                f"Model {name!r} is not loaded: load it first (POST /models/{name}/load)"
            )
        if touch:
            model.touch()
        return model

    def list(self) -> list[LoadedModel]:
        """The loaded models, most recently used first."""
        with self._lock:
            models = list(self._models.values())
        return sorted(models, key=lambda m: m.use_seq, reverse=True)

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._models

    def budget_bytes(self, device: torch.device) -> int | None:
        """The memory budget of ``device``: a fraction of a GPU, the CPU limit, or None."""
        total = device_total_bytes(device)
        if total is not None:
            return int(total * self.gpu_memory_fraction)
        if device.type == "cpu":
            return self.cpu_memory_bytes
        return None

    # ------------------------------------------------------------------ changes

    def load(
        self,
        manifest: Manifest,
        path: Path,
        device: str | None = None,
        pin: bool = False,
        allow_pickle: bool = False,
    ) -> LoadedModel:
        """Load ``manifest``'s model from ``path`` (blocking), evicting LRU unpinned models
        if the budget requires. Loading a model already loaded on the same device returns
        it (pinning it if asked); on another device is a ``Conflict``."""
        target = resolve_device(device or self.device_setting)
        name = manifest.name
        with self._name_lock(name):
            with self._lock:
                existing = self._models.get(name)
            if existing is not None:
                if existing.device != device_str(target):
                    raise Conflict(
                        f"Model {name!r} is already loaded on {existing.device}; "
                        f"unload it before loading it on {device_str(target)}",
                        error="Already loaded",
                    )
                existing.pinned = existing.pinned or pin
                existing.touch()
                return existing
            # Every check that can refuse the model runs before anything is evicted.
            preflight = _loaders().preflight
            with _CONSTRUCTION:
                checked = preflight(manifest, Path(path), target.type, allow_pickle)
            victims = self._reserve(name, checked, target)
            try:
                for victim in victims:
                    self._release(victim, evicted=True)
                with self._device_lock(target):
                    loaded = self._loader(manifest, Path(path), target, allow_pickle)
                loaded.pinned = pin
                loaded.max_text_chars = self.max_text_chars
                loaded.touch()
                with self._lock:
                    self._models[loaded.name] = loaded
            finally:
                with self._lock:
                    self._loading.pop(name, None)
            return loaded

    def unload(self, name: str) -> UnloadReport:
        """Unload ``name``: refuses new requests, waits (bounded) for those in flight, then
        frees its memory. Other models' loads go on meanwhile."""
        with self._name_lock(name):
            with self._lock:
                model = self._models.pop(name, None)
            if model is None:
                raise ModelNotLoaded(f"Model {name!r} is not loaded")
            model.retire()
            return self._release(model)

    def unload_expired(self, name: str, now: float) -> UnloadReport | None:
        """Unload ``name`` only if it has been idle past its keep-alive at ``now``
        (``LoadedModel.retire_if_expired``, decided under the model's lock, so a request
        that got in first keeps it); None when it was not unloaded."""
        with self._name_lock(name):
            with self._lock:
                model = self._models.get(name)
                if model is None or not model.retire_if_expired(now):
                    return None
                self._models.pop(name)
            return self._release(model)

    def pin(self, name: str, pinned: bool = True) -> LoadedModel:
        """Keep ``name`` resident (never evicted) or release it to the LRU again."""
        model = self.get(name, touch=False)
        model.pinned = pinned
        return model

    def unload_all(self) -> list[UnloadReport]:
        """Unload every model (server shutdown)."""
        reports = []
        for model in self.list():
            try:
                reports.append(self.unload(model.name))
            except ModelNotLoaded:
                continue  # unloaded meanwhile
        return reports

    # ------------------------------------------------------------------ internals

    def _name_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._name_locks.setdefault(name, threading.Lock())

    def _device_lock(self, device: torch.device) -> threading.Lock | _NoLock:
        """CPU loads run side by side (CPU memory is measured from the tensors); loads onto
        one accelerator take turns, since its allocator's growth measures each load."""
        if device.type == "cpu":
            return _NoLock()
        with self._lock:
            return self._device_locks.setdefault(device_str(device), threading.Lock())

    def _reserve(self, name: str, checked: Preflight, device: torch.device) -> list[LoadedModel]:
        """Under the short lock: plan what to evict for ``name``, take the victims out (no
        new requests reach them) and hold ``name``'s budget until it is resident."""
        with self._lock:
            victims = self._plan_eviction(name, checked, device)
            for victim in victims:
                self._models.pop(victim.name, None)
                victim.retire()
            self._loading[name] = _Reservation(device_str(device), checked.need_bytes)
        return victims

    def _release(self, model: LoadedModel, evicted: bool = False) -> UnloadReport:
        """Free a model already taken out of ``_models``, once its requests are done."""
        import torch

        device = torch.device(model.device)
        model.wait_idle(self.drain_timeout_s)
        with model.lock:  # the request running now finishes first; queued ones then fail
            freed = model.allocated_bytes
            model.release()
        release_cached(device)
        after = read_allocator(device)
        return UnloadReport(
            model.name, model.device, freed, after.allocated, after.reserved, evicted
        )

    def _plan_eviction(
        self, name: str, checked: Preflight, device: torch.device
    ) -> list[LoadedModel]:
        """The models to unload so ``name`` fits, or ``MemoryBudgetExceeded``."""
        need = checked.need_bytes
        resident = sorted(self.list(), key=lambda m: m.use_seq)  # least recent first
        victims: list[LoadedModel] = []
        loading = [r for other, r in self._loading.items() if other != name]

        if self.max_loaded is not None and len(resident) + len(loading) + 1 > self.max_loaded:
            excess = len(resident) + len(loading) + 1 - self.max_loaded
            unpinned = [m for m in resident if not m.pinned]
            if len(unpinned) < excess:
                pinned = [m for m in resident if m.pinned]
                raise MemoryBudgetExceeded(
                    f"Cannot load {name!r}: {len(resident)} models are loaded and the limit "
                    f"is {self.max_loaded} (MODELHOST_MAX_LOADED); making room would mean "
                    f"unloading pinned models: {_names(pinned)}. Unpin or unload one first"
                )
            victims.extend(unpinned[:excess])

        budget = self.budget_bytes(device)
        where = device_str(device)
        if budget is None:
            # No budget set: still refuse what this machine's memory could never hold.
            physical = physical_memory_bytes() if device.type in ("cpu", "mps") else None
            if physical is not None and need > physical:
                raise MemoryBudgetExceeded(
                    f"Cannot load {name!r}: it needs about {_size(need)}{_why(checked)}, more "
                    f"than this machine's {_size(physical)} of memory"
                )
            return victims
        if need > budget:
            raise MemoryBudgetExceeded(
                f"Cannot load {name!r}: it needs about {_size(need)}{_why(checked)}, more "
                f"than the whole budget of {where} ({_size(budget)}{self._budget_note(device)})"
            )
        on_device = [m for m in resident if m.device == where]
        used = sum(m.allocated_bytes for m in on_device if m not in victims)
        used += sum(r.need_bytes for r in loading if r.device == where)  # loads in progress
        for candidate in on_device:
            if used + need <= budget:
                break
            if candidate.pinned or candidate in victims:
                continue
            victims.append(candidate)
            used -= candidate.allocated_bytes
        if used + need > budget:
            pinned = [m for m in on_device if m.pinned]
            raise MemoryBudgetExceeded(
                f"Cannot load {name!r} on {where}: it needs about {need / MB:.1f} MB and the "
                f"budget is {budget / MB:.1f} MB{self._budget_note(device)}; even after "
                f"unloading every unpinned model, {used / MB:.1f} MB stay in use by pinned "
                f"models that would have to be unloaded: {_names(pinned)}"
            )
        return victims

    def _budget_note(self, device: torch.device) -> str:
        if device.type == "cuda":
            return f", {self.gpu_memory_fraction:g} of the GPU: MODELHOST_GPU_MEMORY_FRACTION"
        if device.type == "cpu":
            return ": MODELHOST_CPU_MEMORY_LIMIT_GB"
        return ""


class _NoLock:
    """A lock that never waits (CPU loads)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _size(nbytes: int) -> str:
    """Bytes for a message: MB below a GB, GB above."""
    if nbytes >= GB:
        return f"{nbytes / GB:,.1f} GB"
    return f"{nbytes / MB:.1f} MB"


def _why(checked: Preflight) -> str:
    """Where the estimate came from, when it is config.json rather than the weights files."""
    if checked.config_bytes <= checked.weights_bytes:
        return ""
    return (
        f" (its config.json declares {checked.config_parameters:,} parameters; its weights "
        f"files hold {_size(checked.weights_bytes)})"
    )
