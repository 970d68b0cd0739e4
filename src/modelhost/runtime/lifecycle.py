"""One owner for each model's life: load, requests in flight, unload, pin, what disk
eviction must keep, optimize and delete.

``ModelLifecycle`` sits over the ``ModelRegistry`` (memory) and the ``Store`` (disk):

- every inference call goes through ``acquire(name)``, which counts it in flight and
  refuses new requests to a model being unloaded (409) or deleted (404);
- ``unload``, and a delete (``close``, then ``retire``, and ``reopen`` when it ends:
  ``JobManager.remove_model`` drives it), refuse new requests first, wait for a load of
  the model in progress, then (bounded by the registry's ``drain_timeout_s``) for the
  requests in flight;
- ``optimize`` runs as an operation holding the model in use (``operation: "optimizing"``
  in ``/models/managed``), so a delete waits for it to finish;
- ``pin`` means one thing for memory and disk: never evicted, by the memory budget while
  loaded nor by ``MODELHOST_CACHE_LIMIT_GB`` from the cache. It is kept in the manifest
  (``Manifest.pinned``), so it survives restarts and applies again when the model loads;
- disk eviction (``JobManager`` calls ``Store.evict_to_fit`` after each commit) never
  removes the files of a loaded or loading model (``protected``) nor of a pinned one;
- keep-alive: a model idle (no request in flight) for longer than its keep-alive
  (``MODELHOST_KEEP_ALIVE``, or a request's ``keep_alive``) is unloaded by
  ``unload_expired``, which the idle reaper (``runtime.keepalive``) calls; pinned models and
  those kept for ever (-1) stay. A model loaded with keep-alive -1 is recorded in its
  manifest (``keep_loaded``, with ``load_device``), so it is loaded again at start
  (``restore``), as pinned models are;
- ``load_shared`` lets concurrent first requests share one load (on-demand loading);
- ``workers`` holds each loaded model's inference worker (``runtime.batching``): requests
  run on ``worker(loaded)``, and ``describe`` adds its queue to the model's row.

Everything here blocks except ``acquire``/``close``/``reopen``/``worker``/``describe``, which
only take a short lock (safe on the event loop). Importing this module does not import torch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modelhost.errors import LoadFailed, ModelhostError, ModelNotFound
from modelhost.packages import missing_dependency, module_of
from modelhost.runtime.batching import ModelWorker, Workers
from modelhost.runtime.errors import ModelNotLoaded
from modelhost.units import NEVER

if TYPE_CHECKING:
    from modelhost.runtime.loaded import LoadedModel
    from modelhost.runtime.registry import ModelRegistry, UnloadReport
    from modelhost.store import Manifest, Store

log = logging.getLogger(__name__)

LOAD_WAIT_S = 600.0  # how long a delete waits for a load of the model that is under way


def load_error(name: str, exc: Exception) -> ModelhostError:
    """The typed error of a load that raised something untyped: a missing Python module
    (424, naming the pip package) or ``LoadFailed`` (422, saying what the loader raised)."""
    if isinstance(exc, ImportError):
        module = module_of(exc)
        if module is not None:
            return missing_dependency(module, f"Loading model '{name}'")
    text = " ".join(str(exc).split())[:500] or type(exc).__name__
    return LoadFailed(f"Loading model '{name}' failed: {type(exc).__name__}: {text}")


@dataclass
class _Name:
    """What the lifecycle tracks per model name beyond the registry."""

    loads: int = 0  # loads through the lifecycle in progress
    closing: str | None = None  # "deleting" while a delete runs: refuse requests and loads
    changed: threading.Condition = field(default_factory=threading.Condition)
    load_count: int = 0  # loads that made a new resident model since the server started
    current: LoadedModel | None = None  # the resident model of the last load
    device: str | None = None  # where the last load put it (an on-demand reload goes there)
    shared: Future[LoadedModel] | None = None  # the load_shared in progress
    # A load or unload was asked since the server started: the start-up restore leaves the
    # model as that request left it (a pinned model unloaded by hand stays unloaded).
    asked: bool = False


class ModelLifecycle:
    """The owner of every model's life in one server (thread-safe)."""

    def __init__(
        self,
        registry: ModelRegistry,
        store: Store,
        load_wait_s: float = LOAD_WAIT_S,
        keep_alive_s: float = NEVER,
    ) -> None:
        self.registry = registry
        self.store = store
        self.load_wait_s = load_wait_s
        # A loaded model's keep-alive unless a request sets its own (MODELHOST_KEEP_ALIVE).
        self.keep_alive_s = keep_alive_s
        # Called (with the model) when a model's last request in flight ends: the idle
        # reaper's wake-up for short keep-alives. Must not block (runs on the caller).
        self.on_idle: Callable[[LoadedModel], None] | None = None
        self._lock = threading.Lock()  # guards _names; held briefly
        self._names: dict[str, _Name] = {}
        self.workers = Workers()  # each loaded model's inference worker

    def _entry(self, name: str) -> _Name:
        with self._lock:
            return self._names.setdefault(name, _Name())

    def _refuse_if_closing(self, name: str) -> None:
        if self.is_closing(name):
            raise ModelNotFound(f"Model '{name}' is being deleted", error="Model being deleted")

    # ------------------------------------------------------------------ requests

    @contextmanager
    def acquire(self, name: str, operation: str | None = None) -> Iterator[LoadedModel]:
        """The loaded model ``name``, counted in flight until the block ends. Refuses (404)
        a model being deleted and (409) one not loaded or being unloaded. ``operation``
        names what runs (``optimizing``), shown in ``/models/managed`` meanwhile."""
        self._refuse_if_closing(name)
        model = self.registry.get(name)
        if not model.enter(operation):
            raise ModelNotLoaded(
                f"Model '{name}' is being unloaded; load it again (POST /models/{name}/load)"
            )
        try:
            yield model
        finally:
            model.leave(operation)
            if self.on_idle is not None and model.inflight == 0:
                self.on_idle(model)

    def worker(self, loaded: LoadedModel) -> ModelWorker:
        """The inference worker ``loaded``'s requests run on (made on the first); submit
        to it inside ``acquire``, so in-flight counting covers the time queued."""
        return self.workers.worker_for(loaded)

    def describe(self, loaded: LoadedModel) -> dict[str, Any]:
        """``loaded``'s row for ``GET /models/managed``, with its worker's queue."""
        return loaded.describe(queued=self.workers.queued(loaded))

    # ------------------------------------------------------------------ load / unload

    def load(
        self,
        manifest: Manifest,
        device: str | None = None,
        pin: bool = False,
        allow_pickle: bool = False,
        keep_alive_s: float | None = None,
    ) -> LoadedModel:
        """Load an installed model (blocking). A model pinned on disk is pinned in memory
        too; asking for ``pin`` records it in the manifest. ``keep_alive_s`` sets its
        keep-alive (default: the server's for a new load, unchanged for a loaded model).
        A delete that begins while the model loads wins: the model is unloaded again and
        ``ModelNotFound`` raised."""
        name = manifest.name
        entry = self._entry(name)
        with entry.changed:
            entry.asked = True
            if entry.closing is not None:
                raise ModelNotFound(f"Model '{name}' is being deleted", error="Model being deleted")
            entry.loads += 1
        try:
            loaded = self._load_typed(manifest, device, pin or manifest.pinned, allow_pickle)
            if entry.closing is not None:
                self._unload_quietly(name)
                raise ModelNotFound(
                    f"Model '{name}' was deleted while it was loading", error="Model deleted"
                )
        finally:
            with entry.changed:
                entry.loads -= 1
                entry.changed.notify_all()
        if pin and not manifest.pinned:
            self.store.set_pinned(name, True)
        self._adopt(entry, loaded, keep_alive_s)
        return loaded

    def _adopt(self, entry: _Name, loaded: LoadedModel, keep_alive_s: float | None) -> None:
        """Count a load that made a new resident model, set its keep-alive, and record how
        it is loaded in the manifest (read again at start)."""
        with entry.changed:
            fresh = entry.current is not loaded
            if fresh:
                entry.load_count += 1
                entry.current = loaded
                loaded.load_count = entry.load_count
            entry.device = loaded.device
        if keep_alive_s is None:  # the server's for a new load; a reload keeps its own
            keep_alive_s = self.keep_alive_s if fresh else loaded.keep_alive_s
        loaded.set_keep_alive(keep_alive_s)  # a load is a use: the idle time starts again
        self._record(loaded)

    def load_shared(self, manifest: Manifest, device: str | None = None) -> Future[LoadedModel]:
        """Load ``manifest`` in a thread of its own, or join the ``load_shared`` of it already
        under way: concurrent first requests share one load, and their waits hold no thread
        (the caller awaits the future). ``device`` None: where its last load put it."""
        entry = self._entry(manifest.name)
        with entry.changed:
            if entry.shared is not None:
                return entry.shared
            future: Future[LoadedModel] = Future()
            future.set_running_or_notify_cancel()  # a waiter's cancel never cancels the load
            entry.shared = future
            device = device or entry.device

        def run() -> None:
            try:
                loaded = self.load(manifest, device)
            except BaseException as exc:
                self._end_shared(entry)
                future.set_exception(exc)
                return
            self._end_shared(entry)
            future.set_result(loaded)

        name = f"modelhost-load-{manifest.name}"
        threading.Thread(target=run, name=name, daemon=True).start()
        return future

    @staticmethod
    def _end_shared(entry: _Name) -> None:
        with entry.changed:
            entry.shared = None

    def set_keep_alive(self, loaded: LoadedModel, keep_alive_s: float) -> None:
        """A request's ``keep_alive``: ``loaded`` stays that long once idle, from now on
        (blocking: a change to or from -1 is recorded in the manifest)."""
        loaded.set_keep_alive(keep_alive_s)
        self._record(loaded)

    def _record(self, loaded: LoadedModel) -> None:
        """Write ``keep_loaded`` (kept for ever) and ``load_device`` to the manifest when
        they changed; a failed write loses only the reload at start."""
        try:
            self.store.set_load_state(loaded.name, loaded.keep_alive_s < 0, loaded.device)
        except OSError:
            log.warning("could not record how %s is loaded", loaded.name, exc_info=True)

    def _load_typed(
        self, manifest: Manifest, device: str | None, pin: bool, allow_pickle: bool
    ) -> LoadedModel:
        """``registry.load``, every failure a ``ModelhostError`` (never a bare 500)."""
        try:
            return self.registry.load(
                manifest, self.store.model_path(manifest.name), device, pin, allow_pickle
            )
        except ModelhostError:
            raise
        except Exception as exc:
            log.warning("loading %s failed", manifest.name, exc_info=exc)
            raise load_error(manifest.name, exc) from exc

    def unload(self, name: str) -> UnloadReport:
        """Unload ``name``: new requests are refused, those in flight finish (bounded). It
        is no longer loaded again at start (unless pinned)."""
        entry = self._entry(name)
        with entry.changed:
            entry.asked = True
        report = self.registry.unload(name)
        try:
            self.store.set_load_state(name, False, None)
        except OSError:
            log.warning("could not record that %s is unloaded", name, exc_info=True)
        return report

    # ------------------------------------------------------------------ keep-alive

    def expiries(self) -> list[tuple[str, float]]:
        """``(name, when)`` (``time.monotonic``) of each loaded model due to be unloaded for
        being idle; models in use, pinned, kept for ever or being deleted are not due."""
        due = []
        for model in self.registry.list():
            when = model.expires_at()
            if when is not None and not self.is_closing(model.name):
                due.append((model.name, when))
        return due

    def unload_expired(self, name: str, now: float) -> UnloadReport | None:
        """Unload ``name`` if it has been idle past its keep-alive at ``now`` (blocking);
        None when it is in use again, pinned, kept, or gone. The reaper's only way out."""
        if self.is_closing(name):
            return None  # the delete unloads it
        return self.registry.unload_expired(name, now)

    def restore(self) -> list[str]:
        """Load the pinned models and those loaded with keep-alive -1 when the server last
        stopped, each on the device of its last load (blocking; at start, in the
        background). A model that fails to load is logged and skipped. Returns the names
        loaded."""
        restored = []
        for manifest in self.store.list():
            wanted = (manifest.pinned or manifest.keep_loaded) and manifest.spec.loadable
            # Loaded already (a request came first): its keep-alive is the request's now.
            if (
                not wanted
                or self.is_closing(manifest.name)
                or self._entry(manifest.name).asked
                or self.registry.is_loaded(manifest.name)
            ):
                continue
            keep = NEVER if manifest.keep_loaded else None
            try:
                self.load(manifest, manifest.load_device, keep_alive_s=keep)
            except Exception:  # one model's failure must not keep the others unloaded
                log.warning("could not load %s again at start", manifest.name, exc_info=True)
                continue
            restored.append(manifest.name)
        return restored

    def _unload_quietly(self, name: str) -> UnloadReport | None:
        try:
            return self.registry.unload(name)
        except ModelNotLoaded:
            return None

    # ------------------------------------------------------------------ pin

    def pin(self, name: str, pinned: bool = True) -> Manifest:
        """Pin (or unpin) an installed model in memory and on disk; persisted."""
        manifest = self.store.set_pinned(name, pinned)
        if self.registry.is_loaded(name):
            try:
                self.registry.pin(name, pinned)
            except ModelNotLoaded:
                pass  # unloaded meanwhile: the manifest still carries the pin
        return manifest

    # ------------------------------------------------------------------ delete

    def close(self, name: str) -> None:
        """Begin deleting ``name``: from now on requests get 404 and loads are refused."""
        entry = self._entry(name)
        with entry.changed:
            entry.closing = "deleting"

    def reopen(self, name: str) -> None:
        """End a delete (done or failed): the name may be installed and loaded again."""
        entry = self._entry(name)
        with entry.changed:
            entry.closing = None
            entry.changed.notify_all()

    def is_closing(self, name: str) -> bool:
        """Whether a delete of ``name`` is running."""
        with self._lock:
            entry = self._names.get(name)
        return entry is not None and entry.closing is not None

    def retire(self, name: str) -> UnloadReport | None:
        """Take a closing model out of memory (blocking): wait for a load of it under way,
        then for its requests in flight, then unload it. None when it was not loaded."""
        entry = self._entry(name)
        with entry.changed:
            entry.changed.wait_for(lambda: entry.loads == 0, timeout=self.load_wait_s)
        return self._unload_quietly(name)

    # ------------------------------------------------------------------ disk

    def protected(self) -> set[str]:
        """Names whose files disk eviction must keep: loaded or loading models."""
        with self._lock:
            loading = {name for name, entry in self._names.items() if entry.loads}
        return loading | {model.name for model in self.registry.list()}
