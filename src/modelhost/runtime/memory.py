"""Counting parameters and measuring memory: exact on CPU, allocator deltas on CUDA/MPS.

Dynamically quantized Linear layers keep their int8 weight in packed form, outside
``parameters()``; they are unpacked here so counts and bytes stay true after ``optimize``.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the server starts without torch
    import torch
    from torch import nn


def _packed_tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    """Weights and biases held in quantized modules' packed params."""
    import torch

    for sub in module.modules():
        packed = getattr(sub, "_packed_params", None)
        if packed is None or isinstance(packed, torch.Tensor):
            continue
        unpack = getattr(packed, "_weight_bias", None)
        if unpack is None:
            continue
        weight, bias = unpack()
        yield weight
        if bias is not None:
            yield bias


def _unique(tensors: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    seen: set[int] = set()
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield tensor


def count_parameters(*modules: nn.Module | None) -> int:
    """Parameters of the modules (shared ones once), packed quantized weights included."""
    total = 0
    for module in modules:
        if module is None:
            continue
        total += sum(p.numel() for p in module.parameters())
        total += sum(t.numel() for t in _packed_tensors(module))
    return total


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def weights_bytes(*modules: nn.Module | None) -> int:
    """Bytes of the modules' parameters and buffers (and packed quantized weights)."""
    total = 0
    for module in modules:
        if module is None:
            continue
        total += sum(_nbytes(p) for p in _unique(module.parameters()))
        total += sum(_nbytes(b) for b in _unique(module.buffers()))
        total += sum(_nbytes(t) for t in _packed_tensors(module))
    return total


@dataclass(frozen=True)
class AllocatorReading:
    """The device allocator's counters at one moment (zeros on CPU)."""

    allocated: int
    reserved: int


def read_allocator(device: torch.device) -> AllocatorReading:
    """Allocated and reserved bytes of the device's allocator after pending work ends."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return AllocatorReading(
            torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        )
    if device.type == "mps":
        torch.mps.synchronize()
        return AllocatorReading(
            torch.mps.current_allocated_memory(), torch.mps.driver_allocated_memory()
        )
    return AllocatorReading(0, 0)


def release_cached(device: torch.device) -> None:
    """Collect garbage and hand the allocator's unused cache back to the driver."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def device_total_bytes(device: torch.device) -> int | None:
    """Total memory of a CUDA device; ``None`` elsewhere."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def physical_memory_bytes() -> int | None:
    """This machine's physical memory, where the OS reports it (Linux, macOS)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None
