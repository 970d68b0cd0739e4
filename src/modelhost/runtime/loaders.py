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

import torch
from huggingface_hub.errors import StrictDataclassError

from modelhost.errors import ModelhostError
from modelhost.runtime.device import device_str
from modelhost.runtime.errors import (
    MemoryBudgetExceeded,
    PickleRefused,
    UnsupportedModel,
    first_line,
)
from modelhost.runtime.families.base import LoadOptions, Parts
from modelhost.runtime.families.detect import detect_family
from modelhost.runtime.families.registry import adapter_for
from modelhost.runtime.families.vocabulary import FamilyInfo
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


def _weights_only_refusal(exc: BaseException) -> str | None:
    """What torch's restricted unpickler refused, when ``exc`` (or its cause) is that."""
    while exc is not None:
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            return f"it tries to use {found.group(1)}" if found else " ".join(text.split())[:300]
        exc = exc.__cause__ or exc.__context__
    return None


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
            f"({first_line(exc)}): unload other models or lower the memory budget"
        )
    if isinstance(exc, (OSError, ValueError, RuntimeError, TypeError, KeyError, AttributeError,
                        IndexError, EOFError, StrictDataclassError)):  # fmt: skip
        log.warning("loading %s failed", path, exc_info=exc)
        return UnsupportedModel(
            f"Model files in {path.name} could not be loaded: {first_line(exc)}"
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
        # A fact about the family, asked of its adapter once, here: the loaded model is
        # then plain data that never looks its family up again.
        is_tts=adapter_for(info.family).synthesize is not None,
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
