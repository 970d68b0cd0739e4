"""The speech core shared by ``POST /v1/audio/speech`` and its long-text jobs.

``SpeechRequest`` is OpenAI's request body (plus modelhost's ``seed``); ``resolve_voice``
turns its ``voice`` into what the model's family takes as ``speaker``; ``synthesize_sentence``
speaks one sentence on the model's own inference worker; ``apply_speed`` changes the tempo
without changing the pitch (FFmpeg's ``atempo``); ``sentence_seed`` derives sentence ``i``'s
seed from the request's. Nothing here knows about HTTP: the API and the jobs layer both call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from modelhost.errors import InvalidRequest
from modelhost.names import NAME_SCHEMA
from modelhost.units import DURATION_SCHEMA

if TYPE_CHECKING:  # annotations only: no torch or numpy on import
    import numpy as np

    from modelhost.runtime.batching import ModelWorker
    from modelhost.runtime.loaded import LoadedModel
    from modelhost.runtime.wav import Audio

# OpenAI's built-in voice names, in the order its API reference lists them; built-in name
# number i speaks with the model's own voice number i (modulo how many it has).
OPENAI_VOICES: tuple[str, ...] = (
    "alloy",
    "ash",
    "ballad",
    "coral",
    "echo",
    "fable",
    "nova",
    "onyx",
    "sage",
    "shimmer",
    "verse",
    "marin",
    "cedar",
)
DEFAULT_VOICE = "default"
MAX_INPUT_CHARS = 4096  # OpenAI's cap for /v1/audio/speech; longer texts go to the jobs API
MIN_SPEED, MAX_SPEED = 0.25, 4.0
# One atempo instance takes factors in [0.5, 2.0] (FFmpeg's limits; wider ones are chained).
_ATEMPO_MIN, _ATEMPO_MAX = 0.5, 2.0
_SEED_MAX = 2**64 - 1
# The largest seed a request may send: 2^53 - 1, the largest integer every JSON reader holds
# exactly (most clients and schema tools read numbers as doubles). Past it, neighbouring
# integers read as one double: with "maximum: 2^64 - 1" in the schema, tools sent seeds over it
# (2^64 - 1 reads as 2^64) that they held valid and the server refused.
SEED_LIMIT = 2**53 - 1
T = TypeVar("T")

ResponseFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
StreamFormat = Literal["audio", "sse"]


class VoiceId(BaseModel):
    """OpenAI's custom-voice reference, ``{"id": "..."}``: here, any of the model's voices."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)


class SpeechRequest(BaseModel):
    """The body of ``POST /v1/audio/speech`` (and ``/v1/audio/speech/jobs``): OpenAI's fields
    plus ``seed``. Unknown fields are refused (400 naming them): the openai client sends only
    these. ``input``'s upper bound is the endpoint's (``MAX_INPUT_CHARS`` for the direct one)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(
        min_length=1,
        description="an installed text-to-speech model's name",
        json_schema_extra=NAME_SCHEMA,
    )
    input: str = Field(min_length=1, description="the text to speak")
    voice: str | VoiceId | None = Field(
        default=None,
        description="one of the model's voices (GET /v1/audio/voices?model=NAME) or an "
        "OpenAI built-in name (alloy, ash, ...) mapped onto them; omitted: the model's first",
    )
    response_format: ResponseFormat = "mp3"
    speed: float = Field(default=1.0, ge=MIN_SPEED, le=MAX_SPEED, strict=True, allow_inf_nan=False)
    instructions: str | None = Field(
        default=None, description="accepted; no model served here can follow them (ignored)"
    )
    stream_format: StreamFormat = "audio"
    # Within the range torch.manual_seed takes (see SEED_LIMIT); sentence i is spoken with
    # sentence_seed(seed, i).
    seed: int | None = Field(default=None, ge=0, le=SEED_LIMIT)
    # modelhost's (Ollama's), not OpenAI's; checked by the API (a 400 naming the syntax).
    keep_alive: Any = Field(
        default=None,
        description="how long the model stays loaded once idle, from now on: 5m, 30s, 1h or "
        "seconds; -1 never unloads it, 0 right after this request",
        json_schema_extra=DURATION_SCHEMA,
    )

    @property
    def voice_name(self) -> str | None:
        """The voice asked for, whichever of OpenAI's two forms it came in."""
        return self.voice.id if isinstance(self.voice, VoiceId) else self.voice

    def ignored_fields(self) -> list[str]:
        """Fields given that no model served here can use (named in a response header)."""
        return ["instructions"] if self.instructions else []


# --------------------------------------------------------------------------- voices


@dataclass(frozen=True)
class Voice:
    """A resolved voice: the model's own voice name and the ``speaker`` its family takes."""

    name: str
    speaker: Any


def model_voices(loaded: LoadedModel) -> list[str]:
    """The model's own voice names, as its family adapter lists them (``["default"]`` for a
    family that has one voice or whose adapter does not say)."""
    from modelhost.runtime.families.registry import adapter_for

    voices = getattr(adapter_for(loaded.family), "voices", None)
    names = list(voices(loaded)) if voices is not None else []
    return names or [DEFAULT_VOICE]


def builtin_voices(loaded: LoadedModel) -> dict[str, str]:
    """OpenAI's built-in names -> the model's own voice each maps to (the i-th built-in name
    to the model's voice i modulo its count)."""
    own = model_voices(loaded)
    return {name: own[i % len(own)] for i, name in enumerate(OPENAI_VOICES)}


def resolve_voice(loaded: LoadedModel, voice: str | VoiceId | None) -> Voice:
    """The model's voice for a request's ``voice`` (its own name, an OpenAI built-in name,
    ``{"id": ...}`` or None for its first voice); ``InvalidRequest`` (400) lists the valid
    names for an unknown one."""
    from modelhost.runtime.families.registry import adapter_for

    name = voice.id if isinstance(voice, VoiceId) else voice
    own = model_voices(loaded)
    if name is None:
        chosen = own[0]
    elif name in own:
        chosen = name
    elif name in OPENAI_VOICES:
        chosen = builtin_voices(loaded)[name]
    else:
        raise InvalidRequest(
            f"Unknown voice {name!r} for model {loaded.name!r}: use one of its voices "
            f"({', '.join(own)}) or an OpenAI voice name mapped onto them "
            f"({', '.join(OPENAI_VOICES)}); GET /v1/audio/voices?model={loaded.name} lists them",
            error="Unknown voice",
        )
    speaker_for = getattr(adapter_for(loaded.family), "speaker_for_voice", None)
    speaker = speaker_for(loaded, chosen) if speaker_for is not None else None
    return Voice(chosen, speaker)


# --------------------------------------------------------------------------- synthesis


def sentence_seed(seed: int | None, index: int) -> int | None:
    """Sentence ``index``'s seed: ``seed + index``, wrapping past 2^64 - 1 to 0 (None stays
    None: each sentence random). Sentence 0 uses the request's seed itself, so a one-sentence
    input sounds exactly as ``/synthesize`` with that seed."""
    if seed is None:
        return None
    value = seed + index
    return value - 2**64 if value > _SEED_MAX else value


# Test hook: callables run (on the model's worker thread) after each sentence synthesized,
# with the model's name and the sentence's index. Tests count sentences with it; keep
# listeners quick and never raising.
sentence_listeners: list[Callable[[str, int], None]] = []
_listeners_lock = threading.Lock()


def add_sentence_listener(listener: Callable[[str, int], None]) -> Callable[[], None]:
    """Register a test hook listener; returns the function that removes it."""
    with _listeners_lock:
        sentence_listeners.append(listener)

    def remove() -> None:
        with _listeners_lock:
            if listener in sentence_listeners:
                sentence_listeners.remove(listener)

    return remove


def _notify(model: str, index: int) -> None:
    with _listeners_lock:
        listeners = list(sentence_listeners)
    for listener in listeners:
        listener(model, index)


# How long a cancelled request still holds its model for the sentence running on the worker.
FINISH_WAIT_S = 2.0


async def synthesize_sentence(
    loaded: LoadedModel,
    text: str,
    speaker: Any,
    seed: int | None,
    *,
    worker: ModelWorker,
    index: int = 0,
    max_new_tokens: int | None = None,
) -> Audio:
    """Speak ``text`` (one sentence) on ``loaded``'s own inference worker (``worker``, which
    the lifecycle keeps: ``ModelLifecycle.worker(loaded)``), batched with other requests
    where its family batches: one worker call per sentence, so other requests interleave
    between a long text's sentences. Hold the model (``lifecycle.acquire``) around it.
    Cancelling the await drops the sentence if it has not started, and waits for it to end
    if it has."""
    from modelhost.offloop import import_off_loop

    # torch behind it: imported in a thread the first time, never on the event loop.
    synthesize_work = (await import_off_loop("modelhost.runtime.inference")).synthesize_work
    work, batch_fn = synthesize_work(
        loaded, text, speaker, max_new_tokens=max_new_tokens, seed=seed
    )
    future = worker.submit(work, batch_fn)
    future.add_done_callback(lambda f: _spoken(f, loaded.name, index))
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        await _finish_running(future)
        raise


async def _finish_running(future: Future) -> None:
    """After a cancel: a sentence already running on the worker cannot be stopped, so wait
    (shielded from the cancel, at most ``FINISH_WAIT_S``) until it ends, and the caller's
    hold on the model lasts while the model is in use. Bounded, so that a long sentence
    (Bark: minutes on a CPU) cannot hold a shutdown: past the bound an unload still cannot
    free the model under the sentence (``release`` waits for the model's lock). A queued
    sentence was dropped by the cancel."""
    if future.done():
        return
    import anyio

    with anyio.CancelScope(shield=True) as scope, contextlib.suppress(BaseException):
        scope.deadline = anyio.current_time() + FINISH_WAIT_S
        await asyncio.wrap_future(future)


def _spoken(future: Future, model: str, index: int) -> None:
    """Tell the listeners a sentence was spoken (not when it was dropped or failed)."""
    if not future.cancelled() and future.exception() is None:
        _notify(model, index)


# --------------------------------------------------------------------------- speed

# Tempo changes and encoding run here: neither on the event loop nor on asyncio's default
# pool (the control plane's), nor on the model's worker (other requests would wait on it).
AUDIO_THREADS = 2
_audio_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


async def run_audio(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the audio threads (speed changes, encoding), awaited."""
    global _audio_pool
    with _pool_lock:
        if _audio_pool is None:
            _audio_pool = ThreadPoolExecutor(AUDIO_THREADS, thread_name_prefix="modelhost-audio")
    return await asyncio.get_running_loop().run_in_executor(_audio_pool, fn, *args)


def tempo_factors(speed: float) -> list[float]:
    """``speed`` as a product of factors each within one atempo's [0.5, 2.0]."""
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise InvalidRequest(f"speed must be from {MIN_SPEED} to {MAX_SPEED}, not {speed}")
    factors: list[float] = []
    while speed > _ATEMPO_MAX:
        factors.append(_ATEMPO_MAX)
        speed /= _ATEMPO_MAX
    while speed < _ATEMPO_MIN:
        factors.append(_ATEMPO_MIN)
        speed /= _ATEMPO_MIN
    return [*factors, speed]


def apply_speed(samples: np.ndarray, rate: int, speed: float) -> np.ndarray:
    """``samples`` (mono float at ``rate`` Hz) played ``speed`` times as fast, pitch kept:
    FFmpeg's ``atempo`` filter (chained for speeds beyond one atempo's 0.5-2.0), through
    PyAV's filter graph. ``speed`` 1.0 returns the samples unchanged."""
    import numpy as np  # here, not at the top: the server starts without numpy

    data = np.asarray(samples, dtype=np.float32).reshape(-1)
    if speed == 1.0 or len(data) == 0:
        return data
    import av

    graph = av.filter.Graph()
    node = graph.add_abuffer(
        format="flt", sample_rate=rate, layout="mono", time_base=Fraction(1, rate)
    )
    for factor in tempo_factors(speed):
        step = graph.add("atempo", f"{factor:.6f}")
        node.link_to(step)
        node = step
    sink = graph.add("abuffersink")
    node.link_to(sink)
    graph.configure()
    frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
    graph.push(frame)
    graph.push(None)
    chunks: list[np.ndarray] = []
    while True:
        try:
            chunks.append(graph.pull().to_ndarray().reshape(-1))
        except (av.error.EOFError, BlockingIOError):
            break
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
