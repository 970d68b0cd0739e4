"""Encode mono float audio into the formats OpenAI's speech API answers, with PyAV (FFmpeg).

``encode_audio(samples, rate, fmt)`` gives the whole file. ``pcm`` is raw 16-bit signed
little-endian mono at 24 kHz (what OpenAI documents and its clients assume), resampled from
the model's rate; the other formats keep the model's rate where the codec allows it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

PCM_RATE = 24_000


@dataclass(frozen=True)
class AudioFormat:
    """How one ``response_format`` is written: container, codec and media type."""

    name: str
    container: str | None  # None: raw samples, no container
    codec: str
    media_type: str
    # Sample rates the codec takes (None: any); the first one >= the input's is used.
    rates: tuple[int, ...] | None = None


FORMATS: dict[str, AudioFormat] = {
    "mp3": AudioFormat(
        "mp3", "mp3", "libmp3lame", "audio/mpeg",
        (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000),
    ),
    "opus": AudioFormat("opus", "ogg", "libopus", "audio/ogg", (8000, 12000, 16000, 24000, 48000)),
    "aac": AudioFormat(
        "aac", "adts", "aac", "audio/aac",
        (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000),
    ),
    "flac": AudioFormat("flac", "flac", "flac", "audio/flac"),
    "wav": AudioFormat("wav", "wav", "pcm_s16le", "audio/wav"),
    "pcm": AudioFormat("pcm", None, "pcm_s16le", "audio/pcm", (PCM_RATE,)),
}


def audio_format(name: str) -> AudioFormat:
    """The format called ``name``; ``KeyError`` names the ones there are."""
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown audio format {name!r}; one of {', '.join(FORMATS)}") from None


def output_rate(fmt: AudioFormat, rate: int) -> int:
    """The sample rate ``fmt`` is written at for input at ``rate`` Hz."""
    if fmt.rates is None:
        return rate
    if fmt.name == "pcm":
        return PCM_RATE
    return next((r for r in fmt.rates if r >= rate), fmt.rates[-1])


def _as_int16_frames(samples: np.ndarray) -> np.ndarray:
    data = np.nan_to_num(np.asarray(samples, dtype=np.float32).reshape(-1))
    return np.round(np.clip(data, -1.0, 1.0) * 32767.0).astype("<i2")


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``samples`` (float, mono) at ``target`` Hz, resampled by FFmpeg's swresample."""
    if rate == target or len(samples) == 0:
        return np.asarray(samples, dtype=np.float32)
    import av

    frame = _frame(np.asarray(samples, dtype=np.float32), rate, "flt")
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    chunks = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def _frame(data: np.ndarray, rate: int, sample_format: str):
    import av

    frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format=sample_format, layout="mono")
    frame.sample_rate = rate
    return frame


def encode_audio(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """The whole of ``samples`` (mono float in [-1, 1] at ``rate`` Hz) as a ``fmt`` file."""
    spec = audio_format(fmt)
    target = output_rate(spec, rate)
    data = resample(samples, rate, target)
    if spec.container is None:
        return _as_int16_frames(data).tobytes()
    import av

    out = io.BytesIO()
    with av.open(out, mode="w", format=spec.container) as container:
        stream = container.add_stream(spec.codec, rate=target, layout="mono")
        pcm = _as_int16_frames(data).astype(np.float32) / 32767.0
        frame = _frame(pcm.astype(np.float32), target, "flt")
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()
