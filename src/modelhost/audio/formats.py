"""The audio formats OpenAI's speech API answers: container, codec, media type and rates.

Pure data, free of numpy and PyAV, so the API can validate a request and name its media type
without importing an encoder (:mod:`modelhost.audio.encode` writes the bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

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


# Bits per second for the lossy codecs whose FFmpeg default is too low: libmp3lame's is
# about 24 kbit/s for 16 kHz mono, audibly poor; 64 kbit/s keeps speech clean.
BIT_RATES: dict[str, int] = {"mp3": 64_000}


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
