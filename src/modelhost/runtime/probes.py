"""Representative inputs for ``optimize``'s latency and agreement checks: the ``Probe`` type
and the shared sample inputs and helpers each family builds its probe from (in its adapter's
module). Asking a model's adapter for its probe is ``optimize``'s (``probe_for``): the
adapters import this module, so it must not look them up (an import cycle through the
family registry).

A probe runs one deterministic forward pass of the family's model (and vocoder) and returns
what it compares, as float32 on the CPU: class probabilities, unit-norm embeddings,
next-token probabilities under teacher forcing, or audio. ``relative`` probes compare
differences against the reference's peak (audio has no fixed scale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from modelhost.runtime.loaded import LoadedModel

SAMPLE_TEXTS = [
    "The new model is a good test of the server.",
    "hello world, this is a short sentence about speech synthesis.",
    "Sphinx of black quartz, judge my vow.",
    "a bad movie is still a movie",
]
PROBABILITY_TOLERANCE = 0.02
EMBEDDING_TOLERANCE = 0.02
AUDIO_TOLERANCE = 0.05

Runner = Callable[[nn.Module, "nn.Module | None"], torch.Tensor]


@dataclass(frozen=True)
class Probe:
    """One representative forward pass and how its outputs are compared."""

    run: Runner
    compared: str
    tolerance: float
    relative: bool = False


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating parameter (float32 when it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def on_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors moved to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax of ``logits`` as float32 on the CPU (what probability probes compare)."""
    return torch.softmax(logits.float(), dim=-1).cpu()


def tone(rate: int, seconds: float = 2.0) -> np.ndarray:
    """Two sine tones at ``rate`` (a deterministic audio input)."""
    t = np.arange(int(rate * seconds)) / rate
    signal = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 1330 * t)
    return signal.astype(np.float32)


def probe_parts(loaded: LoadedModel) -> tuple[nn.Module, torch.device, Any]:
    """A loaded model's module, its device and its processor, for building a probe."""
    model = loaded.model
    assert model is not None
    return model, _device(model), loaded.processor


def sentence_batch(proc: Any, device: torch.device) -> dict:
    """``SAMPLE_TEXTS`` tokenised by ``proc`` (padded, truncated) on ``device``."""
    batch = proc(SAMPLE_TEXTS, padding=True, truncation=True, return_tensors="pt")
    return on_device(dict(batch), device)
