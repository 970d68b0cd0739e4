"""Loading an installed model: one loader per family, measured memory, pickle policy.

Every loader reads only local files (``local_files_only``), never runs repository code
(no ``trust_remote_code``), and reads safetensors unless the caller opted in to pickled
weights, which Transformers then reads with ``torch.load(weights_only=True)``. Models load
in float32 on CPU and MPS and in their stored dtype on CUDA.
"""

from __future__ import annotations

import logging
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError

from modelhost.errors import ModelhostError
from modelhost.runtime.device import device_str
from modelhost.runtime.errors import (
    MalformedWeights,
    MemoryBudgetExceeded,
    PickleRefused,
    UnsupportedModel,
)
from modelhost.runtime.families import FamilyInfo, detect_family
from modelhost.runtime.families.base import LoadOptions, Parts
from modelhost.runtime.families.registry import adapter_for
from modelhost.runtime.loaded import LoadedModel
from modelhost.runtime.memory import (
    count_parameters,
    read_allocator,
    release_cached,
    weights_bytes,
)
from modelhost.runtime.pretrained import stream_enabled
from modelhost.store.manifest import Manifest

log = logging.getLogger(__name__)


def _hf_kwargs(device: torch.device, safetensors: bool) -> dict[str, Any]:
    return {
        "local_files_only": True,
        # Pickles were allowed (check_pickle): each folder then takes safetensors where it
        # has them and its .bin otherwise (a bundle may mix the two).
        "use_safetensors": True if safetensors else None,
        "dtype": "auto" if device.type == "cuda" else torch.float32,
    }


def _weights_only_refusal(exc: BaseException) -> str | None:
    """What torch's restricted unpickler refused, when ``exc`` (or its cause) is that."""
    while exc is not None:
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            return f"it tries to use {found.group(1)}" if found else " ".join(text.split())[:300]
        exc = exc.__cause__ or exc.__context__
    return None


# More layers than any real model has: building that many modules, even on the meta
# device, would take the server's time and memory before the budget could refuse it.
MAX_CONFIG_LAYERS = 10_000
_LAYER_KEYS = ("layers", "n_layer", "num_blocks")


@dataclass(frozen=True)
class Preflight:
    """What ``preflight`` checked and found, before anything is allocated."""

    info: FamilyInfo
    safetensors: bool  # no pickled weights are read
    weights_bytes: int  # what the stored weights take loaded (``estimate_bytes``)
    config_bytes: int = 0  # what config.json's architecture takes loaded (0: not sized)
    config_parameters: int = 0

    @property
    def need_bytes(self) -> int:
        """The larger of the two estimates: a config can declare far more than its files."""
        return max(self.weights_bytes, self.config_bytes)


def preflight(
    manifest: Manifest,
    path: Path,
    device_type: str,
    allow_pickle: bool = False,
    from_config: bool = True,
) -> Preflight:
    """Every check a load makes before it allocates: the family, the pickle policy, pickled
    files through ``weights_only``, each safetensors header, and (``from_config``) the
    architecture config.json declares, sized on the meta device. Raises a 4xx error naming
    the file at fault."""
    path = Path(path)
    info = detect_family(manifest, path)
    adapter = adapter_for(info.family)
    safetensors = adapter.check_weights(manifest, path, allow_pickle)
    weights = adapter.estimate_bytes(info, manifest, path, device_type)
    if not from_config:
        return Preflight(info, safetensors, weights)
    parameters, nbytes = adapter.config_size(info, path, device_type)
    return Preflight(info, safetensors, weights, nbytes, parameters)


def _config_error(path: Path, what: object) -> MalformedWeights:
    return MalformedWeights(
        f"{path.name}/config.json is not a valid model config: {what}. Reinstall the model, "
        "or fix its config.json"
    )


def _check_layer_counts(values: Any, path: Path) -> None:
    """Refuse a config (or nested sub-config) declaring an absurd number of layers."""
    if isinstance(values, dict):
        for key, value in values.items():
            if (
                isinstance(value, int)
                and any(k in str(key) for k in _LAYER_KEYS)
                and value > MAX_CONFIG_LAYERS
            ):
                raise _config_error(path, f"{key} is {value}, over {MAX_CONFIG_LAYERS}")
            _check_layer_counts(value, path)


def config_size(path: Path, device_type: str, class_name: str) -> tuple[int, int]:
    """Parameters and loaded bytes of the architecture ``path``/config.json declares: the
    model class built on the meta device (no memory), its parameters priced as the loaders
    load them (float32 off CUDA, the config's dtype on CUDA)."""
    import transformers

    cls = getattr(transformers, class_name)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # parsing only, no model code runs: any failure is the file's
        raise _config_error(path, _first_line(exc)) from None
    _check_layer_counts(config.to_dict(), path)
    try:
        with torch.device("meta"):
            build = cls.from_config if cls.__name__.startswith("Auto") else cls._from_config
            model = build(config)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError,
            OverflowError, AssertionError) as exc:  # fmt: skip
        raise _config_error(path, f"{cls.__name__} cannot be built from it ({exc})") from None
    except Exception as exc:  # the architecture's code; not sizing it is safe, loading checks
        log.warning("could not size %s from its config on meta: %r", path, exc)
        return 0, 0
    stored = getattr(config, "dtype", None)  # transformers maps a saved torch_dtype here
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    float_size = (
        torch.empty((), dtype=stored).element_size()
        if (device_type == "cuda" and isinstance(stored, torch.dtype))
        else 4
    )
    parameters = nbytes = 0
    for tensor in model.parameters():  # shared (tied) parameters are yielded once
        parameters += tensor.numel()
        size = float_size if tensor.is_floating_point() else tensor.element_size()
        nbytes += tensor.numel() * size
    return parameters, nbytes


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _build(
    info: FamilyInfo, path: Path, device: torch.device, safetensors: bool, stream: bool = False
) -> Parts:
    """The family loader's parts moved to ``device`` (``stream``: Transformers weights are
    streamed onto it, ``runtime.pretrained``). Whatever Transformers or torch raise about
    the model's own files becomes a 400 naming the model; running out of memory a 409;
    either way nothing stays allocated."""
    try:
        adapter = adapter_for(info.family)
        parts = adapter.load(info, path, LoadOptions(device, safetensors, stream))
        parts.model.eval().to(device)
        if parts.vocoder is not None:
            parts.vocoder.eval().to(device)
        return parts
    except ModelhostError:
        raise
    except Exception as exc:
        release_cached(device)
        raise _load_error(exc, path, device) from None


def _load_error(exc: Exception, path: Path, device: torch.device) -> Exception:
    """The 4xx error a failed family loader's exception stands for (or ``exc`` itself, a bug)."""
    refusal = _weights_only_refusal(exc)
    if refusal is not None:  # a pickle the pre-check did not see (e.g. a component's)
        return PickleRefused(
            f"A pickled weights file in {path.name} was refused by "
            f"torch.load(weights_only=True): {refusal}; nothing of it ran"
        )
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return MemoryBudgetExceeded(
            f"Loading {path.name} ran out of memory on {device_str(device)} "
            f"({_first_line(exc)}): unload other models or lower the memory budget"
        )
    if isinstance(exc, (OSError, ValueError, RuntimeError, TypeError, KeyError, AttributeError,
                        IndexError, EOFError, StrictDataclassError)):  # fmt: skip
        log.warning("loading %s failed", path, exc_info=exc)
        return UnsupportedModel(
            f"Model files in {path.name} could not be loaded: {_first_line(exc)}"
        )
    return exc


def load(
    manifest: Manifest,
    path: Path,
    device: torch.device,
    allow_pickle: bool = False,
    gpu_stream: bool = True,
) -> LoadedModel:
    """Load an installed model onto ``device`` and measure it. Blocking: call it in a
    worker thread. ``gpu_stream`` (``MODELHOST_GPU_STREAM``): on CUDA, safetensors weights
    are streamed onto the GPU (``runtime.pretrained``) instead of read through the CPU.
    Raises ``UnsupportedModel`` / ``PickleNotAllowed`` / ``PickleRefused`` /
    ``MalformedWeights`` before reading weights when the model cannot or may not be
    loaded (``preflight``; the registry also sizes it from its config first)."""
    path = Path(path)
    checked = preflight(manifest, path, device.type, allow_pickle, from_config=False)
    info = checked.info
    estimate = checked.weights_bytes

    started = time.perf_counter()
    before = read_allocator(device)
    stream = stream_enabled(device, gpu_stream)
    parts = _build(info, path, device, checked.safetensors, stream)
    after = read_allocator(device)
    seconds = time.perf_counter() - started

    exact = weights_bytes(parts.model, parts.vocoder)
    if device.type == "cpu":
        allocated = reserved = exact
    else:
        allocated = max(0, after.allocated - before.allocated)
        reserved = max(0, after.reserved - before.reserved)
    return LoadedModel(
        name=manifest.name,
        family=info.family,
        task=info.task,
        device=device_str(device),
        model=parts.model,
        processor=parts.processor,
        vocoder=parts.vocoder,
        sample_rate=parts.sample_rate,
        parameters=count_parameters(parts.model, parts.vocoder),
        allocated_bytes=allocated,
        reserved_bytes=reserved,
        weights_bytes=exact,
        estimated_bytes=estimate,
        load_seconds=seconds,
        extra={**parts.extra, "model_type": info.model_type},
    )
