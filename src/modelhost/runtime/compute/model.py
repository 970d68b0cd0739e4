"""A loaded model held for a forward: its lock, the loaded check, its device and dtype."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from modelhost.runtime.errors import ModelNotLoaded
from modelhost.runtime.loaded import LoadedModel


@contextlib.contextmanager
def using(loaded: LoadedModel) -> Iterator[nn.Module]:
    """Hold the model's lock, check it is still loaded, mark it used, no autograd."""
    with loaded.lock:
        model = loaded.model
        if model is None:
            raise ModelNotLoaded(f"Model {loaded.name!r} was unloaded; load it again")
        loaded.touch()
        with torch.inference_mode():
            yield model


def processor_of(loaded: LoadedModel) -> Any:
    """The model's processor, for pre-processing that runs before the model's lock is taken
    (VITS tokenizes outside it): ``ModelNotLoaded`` (409) once an unload or delete released
    it while the request was queued, not a ``TypeError`` (500) on ``None``."""
    processor = loaded.processor
    if processor is None:
        raise ModelNotLoaded(f"Model {loaded.name!r} was unloaded; load it again")
    return processor


def device_of(module: nn.Module) -> torch.device:
    """Where the module's parameters are (the CPU for a module without any)."""
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype float inputs must have: the model's first floating parameter's."""
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors moved to ``device`` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
