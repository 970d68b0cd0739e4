"""WAV in and out (16-bit PCM, stdlib ``wave``), base64 audio, and resampling."""

from __future__ import annotations

import base64
import binascii
import io
import wave
from dataclasses import dataclass

import numpy as np

from modelhost.runtime.errors import InvalidInput


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples in [-1, 1] at ``sample_rate`` Hz."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate if self.sample_rate else 0.0

    def to_wav(self) -> bytes:
        return to_wav_bytes(self.samples, self.sample_rate)

    def to_json(self) -> dict[str, object]:
        """The JSON form of ``/synthesize``: base64 WAV plus what describes it."""
        return {
            "audio_base64": base64.b64encode(self.to_wav()).decode("ascii"),
            "sample_rate": self.sample_rate,
            "duration": round(self.duration_s, 6),
            "samples": int(len(self.samples)),
            "format": "wav",
            "encoding": "pcm_s16le",
        }


def to_wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM mono WAV of float samples (clipped to [-1, 1])."""
    if sample_rate <= 0:
        raise ValueError(f"sample rate must be positive, not {sample_rate}")
    data = np.asarray(samples, dtype=np.float32).reshape(-1)
    data = np.nan_to_num(data, nan=0.0, posinf=1.0, neginf=-1.0)
    pcm = np.round(np.clip(data, -1.0, 1.0) * 32767.0).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(int(sample_rate))
        handle.writeframes(pcm.tobytes())
    return out.getvalue()


def parse_wav(data: bytes) -> Audio:
    """A PCM WAV (8/16/32-bit, any channel count) as mono float32 samples in [-1, 1]."""
    try:
        with wave.open(io.BytesIO(data), "rb") as handle:
            channels = handle.getnchannels()
            width = handle.getsampwidth()
            rate = handle.getframerate()
            frames = handle.readframes(handle.getnframes())
    except (wave.Error, EOFError) as exc:
        raise InvalidInput(f"not a PCM WAV file: {exc}") from exc
    if width == 1:
        samples = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 4:
        samples = np.frombuffer(frames, dtype="<i4").astype(np.float32) / 2147483648.0
    else:
        raise InvalidInput(f"unsupported WAV sample width: {width * 8} bits")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return Audio(samples.astype(np.float32), rate)


def decode_base64(text: str, what: str = "audio") -> bytes:
    """Bytes of a base64 string (a ``data:...;base64,`` prefix is allowed)."""
    if not isinstance(text, str) or not text:
        raise InvalidInput(f"{what} must be a non-empty base64 string")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{what} is not valid base64: {exc}") from exc


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """``samples`` at ``rate_out``: polyphase (scipy) when available, else linear."""
    if rate_in == rate_out or len(samples) == 0:
        return samples.astype(np.float32)
    try:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(rate_in, rate_out)
        return resample_poly(samples, rate_out // g, rate_in // g).astype(np.float32)
    except ImportError:
        n_out = max(1, round(len(samples) * rate_out / rate_in))
        positions = np.arange(n_out) * (rate_in / rate_out)
        return np.interp(positions, np.arange(len(samples)), samples).astype(np.float32)
