"""Speech one waveform at a time: the model's lock, the request's seed, the waveform as
``Audio`` at the model's rate. The path of the families that do not batch (SpeechT5, Bark,
Tacotron2, and any registered family): their adapter's ``synthesize`` is
``speak_one(loaded, run, seed)``."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from modelhost.runtime.compute.model import device_of, using
from modelhost.runtime.loaded import LoadedModel
from modelhost.runtime.wav import Audio

# What a refusal of a text too long for one forward advises.
LONG_TEXTS = (
    "Use POST /v1/audio/speech, which speaks a long text sentence by sentence, "
    "or POST /v1/audio/speech/jobs"
)

# Models that sample from torch's global generator (Bark's generate) take this lock, seeded
# or not, so a seeded request's draws are not interleaved with another model's.
_GLOBAL_RNG_LOCK = threading.Lock()


def speak_one(
    loaded: LoadedModel, run: Callable[[nn.Module], torch.Tensor], seed: int | None
) -> Audio:
    """One synthesis under the model's lock with the request's seed (``run(model)`` returns
    the waveform): the one-at-a-time path of the families that do not batch."""
    with using(loaded) as model, _seeded_global_rng(seed, device_of(model)):
        wave = run(model)
    return audio_of(loaded, wave)


def audio_of(loaded: LoadedModel, wave: torch.Tensor) -> Audio:
    """A waveform tensor as float32 ``Audio`` at the model's sample rate."""
    samples = wave.detach().float().reshape(-1).cpu().numpy().astype(np.float32)
    assert loaded.sample_rate is not None
    return Audio(samples, loaded.sample_rate)


@contextlib.contextmanager
def _seeded_global_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run with torch's global generator seeded by ``seed`` (when given), restored after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(int(seed))
        yield
