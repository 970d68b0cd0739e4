"""Encode mono float audio into the formats OpenAI's speech API answers, with PyAV (FFmpeg).

``encode_audio(samples, rate, fmt)`` gives the whole file. ``pcm`` is raw 16-bit signed
little-endian mono at 24 kHz (what OpenAI documents and its clients assume), resampled from
the model's rate; the other formats keep the model's rate where the codec allows it.
"""

from __future__ import annotations

import io
import struct

import numpy as np

from modelhost.audio.formats import BIT_RATES, AudioFormat, audio_format, output_rate


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
    """One mono frame of ``data`` (float32 for "flt", int16 for "s16") at ``rate`` Hz."""
    import av

    frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format=sample_format, layout="mono")
    frame.sample_rate = rate
    return frame


def _add_stream(container, spec: AudioFormat, rate: int):
    stream = container.add_stream(spec.codec, rate=rate, layout="mono")
    if spec.name in BIT_RATES:
        stream.bit_rate = BIT_RATES[spec.name]
    return stream


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
        stream = _add_stream(container, spec, target)
        # 16-bit samples in: the codec gets exactly the WAV's samples (lossless flac decodes
        # to them); FFmpeg converts for codecs that take floats.
        frame = _frame(_as_int16_frames(data), target, "s16")
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


# --------------------------------------------------------------------------- streaming

# A WAV whose length is unknown when its header goes out: RIFF and data sizes at their
# maximum (what streaming servers send; libsndfile and FFmpeg read such a file to its end).
_UNKNOWN_SIZE = 0xFFFFFFFF
# Ogg holds packets until a page is full (about 1 s by default): 20 ms pages let each
# sentence's audio leave as soon as it is encoded.
_OGG_PAGE_US = "20000"


def streaming_wav_header(rate: int) -> bytes:
    """A 16-bit PCM mono WAV header with unknown (maximum) RIFF and data sizes."""
    riff = struct.pack("<4sI4s", b"RIFF", _UNKNOWN_SIZE, b"WAVE")
    fmt_chunk = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, rate, rate * 2, 2, 16)
    return riff + fmt_chunk + struct.pack("<4sI", b"data", _UNKNOWN_SIZE)


class _Sink:
    """A write-only, non-seekable file for PyAV's muxer; ``drain`` takes what it wrote."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        return len(data)

    def seekable(self) -> bool:
        return False

    def drain(self) -> bytes:
        out, self._buffer = bytes(self._buffer), bytearray()
        return out


class StreamEncoder:
    """One response's encoder: ``feed`` successive chunks of mono float samples at ``rate``
    Hz, each returning the bytes ready so far; ``close`` returns the rest. The bytes, joined,
    are one ``fmt`` file (wav: a streaming header with unknown sizes; pcm: raw s16le at
    24 kHz; flac: written whole at close; mp3, opus (ogg), aac (adts): FFmpeg's muxer
    writing to a non-seekable stream, so mp3 carries no gapless header and decoders keep the
    encoder's 1105-sample delay). Each request has its own encoder, so concurrent streams
    never share state. Not thread-safe: one caller."""

    def __init__(self, fmt: str, rate: int) -> None:
        self.spec = audio_format(fmt)
        self.rate = rate
        self.target = output_rate(self.spec, rate)
        self._resampler = None
        if self.target != rate:
            import av

            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self.target)
        self._pending = streaming_wav_header(rate) if fmt == "wav" else b""
        self._sink: _Sink | None = None
        self._container = None
        self._stream = None
        self._pts = 0
        # flac is written whole at close: its header (STREAMINFO: length, MD5) comes first
        # and decoders such as libsndfile refuse a stream whose header lacks the length.
        self._whole: list[np.ndarray] | None = [] if fmt == "flac" else None
        if self.spec.container is not None and fmt not in ("wav", "flac"):
            self._open_container()

    @property
    def media_type(self) -> str:
        return self.spec.media_type

    def _open_container(self) -> None:
        import av

        self._sink = _Sink()
        options = {"page_duration": _OGG_PAGE_US} if self.spec.container == "ogg" else {}
        self._container = av.open(self._sink, mode="w", format=self.spec.container, options=options)
        self._stream = _add_stream(self._container, self.spec, self.target)

    def feed(self, samples: np.ndarray) -> bytes:
        """Encode ``samples``; the bytes of the file that are ready now."""
        data = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._whole is not None:
            self._whole.append(data)
            return b""
        if len(data) and self._resampler is not None:
            data = self._resample(_frame(data, self.rate, "flt"))
        return self._take(self._encode(data))

    def close(self) -> bytes:
        """Flush the resampler, the encoder and the muxer; the file's last bytes."""
        if self._whole is not None:
            whole = np.concatenate(self._whole) if self._whole else np.zeros(0, np.float32)
            self._whole = None
            return encode_audio(whole, self.rate, self.spec.name)
        data = np.zeros(0, np.float32)
        if self._resampler is not None:
            data = self._resample(None)
        out = self._encode(data)
        if self._container is not None:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            out += self._sink.drain()
            self._container = None
        return self._take(out)

    def _take(self, data: bytes) -> bytes:
        out, self._pending = self._pending + data, b""
        return out

    def _resample(self, frame) -> np.ndarray:
        chunks = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    def _encode(self, data: np.ndarray) -> bytes:
        if len(data) == 0:
            return b""
        pcm = _as_int16_frames(data)
        if self._container is None:  # wav and pcm: the frames themselves
            return pcm.tobytes()
        frame = _frame(pcm, self.target, "s16")
        frame.pts = self._pts
        self._pts += len(data)
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._sink.drain()
