"""VITS, batched: every queued caller's text in one padded, masked forward, each item's
noise from its own seed, each waveform cut to its own length, so a batched item equals the
item spoken alone (``tests/test_batching.py``). One request alone takes the same path."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from modelhost.errors import InputTooLong
from modelhost.runtime.compute.inputs import check_text
from modelhost.runtime.compute.model import device_of, float_dtype, processor_of, using
from modelhost.runtime.compute.speech import LONG_TEXTS, audio_of
from modelhost.runtime.errors import InvalidInput
from modelhost.runtime.families.base import BatchPlan
from modelhost.runtime.loaded import LoadedModel
from modelhost.runtime.memory import weights_bytes
from modelhost.runtime.wav import Audio

# VITS's alignment path is a (tokens x frames) matrix and frames grow with tokens: memory
# grows with the square of the text. Measured on the tiny VITS: 1,000 tokens +0.3 GB, 2,000
# +1 GB; 5,000 characters (10,001 tokens with the blanks) took the server past 24 GB.
VITS_MAX_TOKENS = 2048


@dataclass(frozen=True)
class VitsCall:
    """One VITS request, checked: its text, speaker id and seed (None: a random one)."""

    text: str
    speaker: int | None
    seed: int


def vits_call(loaded: LoadedModel, text: str, speaker: Any, seed: int | None) -> VitsCall:
    """The request checked: a speaker id the model has, a seed (random when none is given)."""
    speakers = int(loaded.extra.get("num_speakers", 1))
    if speaker is not None:
        if speakers <= 1:
            raise InvalidInput("this VITS model has a single speaker: omit speaker")
        if isinstance(speaker, bool) or not isinstance(speaker, int):
            raise InvalidInput(f"speaker must be a speaker id from 0 to {speakers - 1}")
        if not 0 <= speaker < speakers:
            raise InvalidInput(f"speaker must be a speaker id from 0 to {speakers - 1}")
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return VitsCall(check_text(text, "text", loaded.max_text_chars), speaker, int(seed) % 2**64)


def vits_batch_plan(loaded: LoadedModel, text: str, speaker: Any, seed: int | None) -> BatchPlan:
    """VITS's batch plan: one group per speaker id; alone, the same path with one item."""
    call = vits_call(loaded, text, speaker, seed)
    return BatchPlan(
        ("vits", call.speaker),
        1,
        call,
        lambda calls: vits_batch(loaded, calls),
        run_one=lambda: vits_batch(loaded, [call])[0],
    )


class _PerItemNoise(TorchFunctionMode):
    """Answers VitsModel's two noise draws from each item's own generator.

    In inference VitsModel draws ``torch.randn(B, 2, T_in)`` (the stochastic duration
    predictor) and then ``torch.randn_like(prior_means)`` (B, C, T_out), both from the global
    generator. Here item ``i`` gets, in the same order, exactly what it would draw alone
    from its generator: noise over its own lengths, zeros over the padding. An item's output
    length is where its expanded prior means stop (padding frames are exactly zero). Torch
    function modes are per thread, so other threads' draws are untouched.
    """

    def __init__(self, generators: list[torch.Generator], input_lengths: list[int]) -> None:
        super().__init__()
        self.generators = generators
        self.input_lengths = input_lengths

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.randn and "generator" not in kwargs:
            size = args[0] if len(args) == 1 and not isinstance(args[0], int) else args
            return self._draw(torch.Size(size), self.input_lengths, torch.float32)
        if func is torch.randn_like:
            like = args[0]
            lengths = [_nonzero_length(like[i]) for i in range(like.shape[0])]
            return self._draw(like.shape, lengths, like.dtype).to(like.device)
        return func(*args, **kwargs)

    def _draw(self, shape: torch.Size, lengths: list[int], dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(shape, dtype=torch.float32)
        for i, (generator, length) in enumerate(zip(self.generators, lengths, strict=True)):
            out[i, ..., :length] = torch.randn(
                (*shape[1:-1], length), generator=generator, dtype=torch.float32
            )
        return out.to(dtype)


def _nonzero_length(frames: torch.Tensor) -> int:
    """The frames up to the last one with a non-zero value (``frames``: C x T)."""
    used = (frames != 0).any(dim=0).nonzero()
    return int(used[-1]) + 1 if used.numel() else 0


def vits_batch(loaded: LoadedModel, calls: Sequence[VitsCall]) -> list[Audio | Exception]:
    """Speak every call's text in one VITS forward (one speaker for the batch): padded and
    masked, each item's noise from its own seed, each waveform cut to its own length; each
    result equals the item spoken alone. An item with no known characters, or too long for
    one forward (``VITS_MAX_TOKENS``), fails alone, before anything runs; long batches are
    cut so that their memory stays within one longest item's (``_vits_chunks``)."""
    processor = processor_of(loaded)
    encoded = [processor(c.text, return_tensors="pt")["input_ids"][0] for c in calls]
    results: list[Any] = [_vits_refusal(int(ids.numel())) for ids in encoded]
    live = [i for i, ids in enumerate(encoded) if results[i] is None]
    if not live:
        if len(calls) == 1:
            raise results[0]  # type: ignore[misc]
        return results
    for part in _vits_chunks(live, [int(ids.numel()) for ids in encoded]):
        for i, audio in zip(part, _vits_run(loaded, calls, encoded, part), strict=True):
            results[i] = audio
    return results


def _vits_refusal(tokens: int) -> Exception | None:
    """Why VITS cannot speak a text of ``tokens`` ids in one forward, None when it can."""
    if tokens == 0:
        return InvalidInput("the text has no characters this model's tokenizer knows")
    if tokens > VITS_MAX_TOKENS:
        return InputTooLong(
            f"the text is {tokens:,} tokens; VITS speaks at most {VITS_MAX_TOKENS:,} (about "
            f"{VITS_MAX_TOKENS // 2:,} characters) in one request: its alignment grows with the "
            f"square of the length. {LONG_TEXTS}",
            param="text",
        )
    return None


def _vits_chunks(live: list[int], lengths: list[int]) -> list[list[int]]:
    """``live`` cut into consecutive batches whose padded cost (items x longest^2) stays
    within one longest-allowed item's: a batch of long texts must not take the memory that
    a single one is refused for. Batched items equal items spoken alone, so cutting changes
    no result."""
    budget = VITS_MAX_TOKENS**2
    chunks: list[list[int]] = []
    for i in live:
        if chunks:
            longest = max(lengths[j] for j in [*chunks[-1], i])
            if (len(chunks[-1]) + 1) * longest**2 <= budget:
                chunks[-1].append(i)
                continue
        chunks.append([i])
    return chunks


def _vits_run(
    loaded: LoadedModel, calls: Sequence[VitsCall], encoded: list[torch.Tensor], live: list[int]
) -> list[Audio]:
    """One padded, masked VITS forward over the ``live`` items of ``calls``."""
    lengths = [int(encoded[i].numel()) for i in live]
    ids = torch.zeros((len(live), max(lengths)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (i, length) in enumerate(zip(live, lengths, strict=True)):
        ids[row, :length] = encoded[i]
        mask[row, :length] = 1
    generators = [torch.Generator().manual_seed(calls[i].seed) for i in live]
    with using(loaded) as model:
        waves = _vits_forward(loaded, model, ids, mask, calls[0].speaker, generators, lengths)
    return [audio_of(loaded, wave) for wave in waves]


class _KeepSpectrogram(nn.Module):
    """Stands in for VitsModel's decoder during a batch: returns the spectrogram as is."""

    def forward(self, spectrogram: torch.Tensor, conditioning: Any = None) -> torch.Tensor:
        return spectrogram


_PRIOR_ATTR = "_modelhost_float64_prior"


def _vits_prior(loaded: LoadedModel, model: nn.Module) -> nn.Module | None:
    """VitsModel without its decoder, in float64 (the text encoder, duration predictor and
    flow), built on first use of a float32 model on the CPU; None elsewhere (a GPU's float64
    is slow, an optimized model has its own precision): the model itself runs then.

    Why: in float32 the batched and the alone forward round differently (other matrix
    shapes, other kernels) and the flow amplifies it to about 3e-5 of full scale. In
    float64 both agree to about 1e-12, so after the cast back the decoder (most of the
    compute, still float32, run per item) sees the same frames either way: a batched item
    equals the item spoken alone. Measured on a full-size VITS (36 M parameters): about 10%
    slower per call; the copy's bytes are added to the model's memory figures."""
    if loaded.optimized or device_of(model).type != "cpu" or float_dtype(model) != torch.float32:
        return None
    prior = getattr(model, _PRIOR_ATTR, None)
    if prior is None:
        decoder = model.decoder
        model.decoder = _KeepSpectrogram()
        try:
            prior = copy.deepcopy(model).to(torch.float64).eval()
        finally:
            model.decoder = decoder
        # A plain attribute, not a submodule: not in the state dict, not touched by .to().
        object.__setattr__(model, _PRIOR_ATTR, prior)
        extra = weights_bytes(prior)
        loaded.weights_bytes += extra
        loaded.allocated_bytes += extra
        loaded.reserved_bytes += extra
    return prior


def _vits_forward(
    loaded: LoadedModel,
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    speaker: int | None,
    generators: list[torch.Generator],
    lengths: list[int],
) -> list[torch.Tensor]:
    """The batched text encoder, duration predictor and flow, then the HiFi-GAN decoder on
    each item's own frames: the decoder's convolutions are not masked, so a padded batch
    would bleed padding into the end of the shorter waveforms. Call with the model's lock."""
    device = device_of(model)
    decoder = model.decoder
    prior = _vits_prior(loaded, model)
    if prior is None:
        model.decoder = _KeepSpectrogram()
    try:
        with _PerItemNoise(generators, lengths):
            output = (prior or model)(
                input_ids=ids.to(device), attention_mask=mask.to(device), speaker_id=speaker
            )
    finally:
        model.decoder = decoder
    # (B, bins, frames): the decoder was bypassed; back to the decoder's precision.
    spectrogram = output.waveform.to(float_dtype(decoder))
    speaker_embedding = None
    if speaker is not None and model.config.num_speakers > 1:
        speaker_id = torch.full((1,), speaker, device=device)
        speaker_embedding = model.embed_speaker(speaker_id).unsqueeze(-1)
    hop = int(np.prod(model.config.upsample_rates))
    waves = []
    for row in range(spectrogram.shape[0]):
        frames = int(output.sequence_lengths[row]) // hop
        waves.append(decoder(spectrogram[row : row + 1, :, :frames], speaker_embedding)[0, 0])
    return waves
