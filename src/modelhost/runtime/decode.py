"""Decode an uploaded audio file (any container and codec FFmpeg reads: wav, flac, mp3,
ogg/opus, m4a/aac, webm ...) to mono float32 samples at one rate, with PyAV."""

from __future__ import annotations

import io

import numpy as np

from modelhost.runtime.errors import InvalidInput


def decode_audio(data: bytes, rate: int, max_seconds: float) -> np.ndarray:
    """The first audio stream of ``data``, downmixed to mono and resampled to ``rate`` Hz.

    Stops decoding once the audio is longer than ``max_seconds`` and refuses it, so a long
    file costs no more than ``max_seconds`` of decoding. Raises ``InvalidInput`` (400) for a
    file FFmpeg cannot read, one without audio, an empty one or a too long one.
    """
    import av

    limit = int(max_seconds * rate)
    try:
        # Metadata in a broken encoding is skipped, not fatal: only the samples matter.
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise InvalidInput("the file holds no audio stream")
            samples = _decoded(container, stream, rate, limit, max_seconds)
    except InvalidInput:
        raise
    except (av.FFmpegError, ValueError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise InvalidInput(
            f"could not decode the file as audio ({why}): send wav, flac, mp3, ogg, m4a or webm"
        ) from None
    if samples.size == 0:
        raise InvalidInput("the audio holds no samples")
    return samples


def _decoded(container, stream, rate: int, limit: int, max_seconds: float) -> np.ndarray:
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    chunks: list[np.ndarray] = []
    total = 0
    for frame in container.decode(stream):
        try:
            converted = resampler.resample(frame)
        except ValueError:  # the stream changed format, layout or rate mid-way
            converted = resampler.resample(None)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            converted += resampler.resample(frame)
        for out in converted:
            chunks.append(out.to_ndarray().reshape(-1))
            total += chunks[-1].size
        if total > limit:
            raise InvalidInput(
                f"the audio is longer than {max_seconds:.0f} s, the most one request takes "
                "(long-form transcription is not supported yet): split it"
            )
    for out in resampler.resample(None):  # what the resampler still holds
        chunks.append(out.to_ndarray().reshape(-1))
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    if samples.size > limit:
        raise InvalidInput(
            f"the audio is longer than {max_seconds:.0f} s, the most one request takes "
            "(long-form transcription is not supported yet): split it"
        )
    return samples.astype(np.float32, copy=False)
