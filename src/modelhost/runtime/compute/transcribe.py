"""``predict`` on a speech-recognition model (Whisper): audio in the request's JSON, one
30-second window, ``{"text": ...}``. (``/v1/audio/transcriptions``, with segments and
language, is ``runtime/transcription.py``.)"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from modelhost.runtime.compute.inputs import int_param
from modelhost.runtime.compute.model import device_of, float_dtype
from modelhost.runtime.errors import InvalidInput
from modelhost.runtime.loaded import LoadedModel
from modelhost.runtime.wav import Audio, decode_base64, parse_wav, resample
from modelhost.runtime.whisper_decoder import decoder_room

MAX_AUDIO_SECONDS = 30.0  # Whisper's window; long-form transcription is not offered yet
MAX_AUDIO_SAMPLES = 48_000 * 600


def audio_input(inputs: Any) -> Audio:
    """Audio from base64 WAV, ``{"audio": base64}`` or ``{"samples": [...], "sampling_rate":
    n}`` (``array`` is accepted for ``samples``)."""
    if isinstance(inputs, str):
        return parse_wav(decode_base64(inputs))
    if isinstance(inputs, dict):
        if "audio" in inputs:
            return parse_wav(decode_base64(inputs["audio"]))
        samples = inputs.get("samples", inputs.get("array"))
        rate = inputs.get("sampling_rate")
        if samples is not None:
            if isinstance(rate, bool) or not isinstance(rate, int) or not 1000 <= rate <= 384_000:
                raise InvalidInput("sampling_rate must be an integer from 1000 to 384000")
            if not isinstance(samples, list) or not samples:
                raise InvalidInput("samples must be a non-empty list of numbers")
            if len(samples) > MAX_AUDIO_SAMPLES:
                raise InvalidInput("too many samples")
            try:
                array = np.asarray(samples, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise InvalidInput(f"samples must be numbers: {exc}") from exc
            if array.ndim != 1 or not np.isfinite(array).all():
                raise InvalidInput("samples must be a flat list of finite numbers")
            return Audio(array, rate)
    raise InvalidInput(
        'audio input must be base64 WAV, {"audio": base64} or '
        '{"samples": [...], "sampling_rate": n}'
    )


def transcribe(loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
    """``predict``: the text of at most ``MAX_AUDIO_SECONDS`` of audio; ``max_new_tokens``
    (capped to the decoder's room), ``language`` and ``task`` parameters."""
    audio = audio_input(inputs)
    if len(audio.samples) == 0:
        raise InvalidInput("the audio has no samples")
    if audio.duration_s > MAX_AUDIO_SECONDS:
        raise InvalidInput(
            f"audio is {audio.duration_s:.1f} s; at most {MAX_AUDIO_SECONDS:.0f} s per request "
            "(long-form transcription is not supported yet)"
        )
    rate = int(loaded.extra["input_sample_rate"])
    samples = resample(audio.samples, audio.sample_rate, rate)
    features = loaded.processor.feature_extractor(
        samples, sampling_rate=rate, return_tensors="pt"
    ).input_features
    features = features.to(device_of(model), float_dtype(model))
    kwargs: dict[str, Any] = {}
    room = max(1, decoder_room(model.config))
    max_new = int_param(params, "max_new_tokens", None, 1, room)
    if max_new is None:  # the checkpoint's own default, capped to the decoder's room
        own = getattr(model.generation_config, "max_new_tokens", None)
        max_new = None if own is None else min(int(own), room)
    if max_new is not None:
        kwargs["max_new_tokens"] = max_new
    for key in ("language", "task"):
        if key in params:
            if not isinstance(params[key], str):
                raise InvalidInput(f"parameter {key} must be a string")
            kwargs[key] = params[key]
    try:
        tokens = model.generate(features, **kwargs)
    except ValueError as exc:  # e.g. a language or task this checkpoint does not know
        raise InvalidInput(str(exc)) from exc
    text = loaded.processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()
    return {"text": text, "sampling_rate": audio.sample_rate, "duration": audio.duration_s}
