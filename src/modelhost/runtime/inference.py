"""Inference on a loaded model: ``synthesize`` for TTS, ``predict`` for every other task.

Both are blocking (call them from a worker thread) and hold the model's lock while they run,
so concurrent requests to one model are serialised and safe (tokenizers and generation keep
per-call state). Bad inputs raise ``InvalidInput``, a ``ValueError``, saying what was
expected.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from modelhost.errors import InputTooLong
from modelhost.runtime.batching import Work
from modelhost.runtime.errors import InvalidInput, ModelNotLoaded
from modelhost.runtime.families.base import BatchPlan
from modelhost.runtime.families.registry import adapter_for
from modelhost.runtime.families.vocabulary import Family
from modelhost.runtime.images import decode_image, pixel_values
from modelhost.runtime.loaded import DEFAULT_MAX_TEXT_CHARS, LoadedModel
from modelhost.runtime.memory import weights_bytes
from modelhost.runtime.sentence_layout import SentenceLayout
from modelhost.runtime.speaker import parse_speaker_embedding
from modelhost.runtime.wav import Audio, decode_base64, parse_wav, resample
from modelhost.runtime.whisper_decoder import decoder_room

MAX_BATCH = 64
# VITS's alignment path is a (tokens x frames) matrix and frames grow with tokens: memory
# grows with the square of the text. Measured on the tiny VITS: 1,000 tokens +0.3 GB, 2,000
# +1 GB; 5,000 characters (10,001 tokens with the blanks) took the server past 24 GB.
VITS_MAX_TOKENS = 2048
BARK_MAX_TOKENS = 256  # BarkProcessor's max_length: it truncates beyond it
LONG_TEXTS = (
    "Use POST /v1/audio/speech, which speaks a long text sentence by sentence, "
    "or POST /v1/audio/speech/jobs"
)
MAX_NEW_TOKENS = 1024
DEFAULT_NEW_TOKENS = 32
MAX_AUDIO_SECONDS = 30.0  # Whisper's window; long-form transcription is not offered yet
MAX_AUDIO_SAMPLES = 48_000 * 600


@contextlib.contextmanager
def _using(loaded: LoadedModel) -> Iterator[nn.Module]:
    """Hold the model's lock, check it is still loaded, mark it used, no autograd."""
    with loaded.lock:
        model = loaded.model
        if model is None:
            raise ModelNotLoaded(f"Model {loaded.name!r} was unloaded; load it again")
        loaded.touch()
        with torch.inference_mode():
            yield model


def _processor(loaded: LoadedModel) -> Any:
    """The model's processor, for pre-processing that runs before the model's lock is taken
    (VITS tokenizes outside it): ``ModelNotLoaded`` (409) once an unload or delete released
    it while the request was queued, not a ``TypeError`` (500) on ``None``."""
    processor = loaded.processor
    if processor is None:
        raise ModelNotLoaded(f"Model {loaded.name!r} was unloaded; load it again")
    return processor


def _device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def _float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype float inputs must have: the model's first floating parameter's."""
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _text(value: Any, what: str = "text", limit: int = DEFAULT_MAX_TEXT_CHARS) -> str:
    """``value`` as a text input of at most ``limit`` characters (the model's
    ``max_text_chars``): 400 for what is not text, 413 for a longer one."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{what} must be a non-empty string")
    try:
        value.encode("utf-8")  # tokenizers raise on lone surrogates
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"{what} is not valid Unicode text: a lone surrogate at character {exc.start}"
        ) from None
    if len(value) > limit:
        raise InputTooLong(
            f"{what} is {len(value):,} characters; one request takes at most {limit:,} "
            "(MODELHOST_MAX_INPUT_CHARS). Send shorter texts; to speak a long text use "
            "POST /v1/audio/speech (spoken sentence by sentence) or POST /v1/audio/speech/jobs",
            param=what.split("[")[0],
        )
    return value


def _texts(value: Any, limit: int) -> tuple[list[str], bool]:
    """A string or a list of strings, and whether a single string was given."""
    if isinstance(value, str):
        return [_text(value, "inputs", limit)], True
    if isinstance(value, list) and value:
        if len(value) > MAX_BATCH:
            raise InvalidInput(f"at most {MAX_BATCH} inputs per request, got {len(value)}")
        return [_text(v, f"inputs[{i}]", limit) for i, v in enumerate(value)], False
    raise InvalidInput("inputs must be a non-empty string or a non-empty list of strings")


def _int_param(params: Mapping[str, Any], key: str, default: int | None, low: int, high: int):
    value = params.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"parameter {key} must be an integer from {low} to {high}")
    return value


def _max_length(tokenizer: Any, config: Any) -> int:
    """The longest input the model takes, in tokens."""
    limits = [int(tokenizer.model_max_length)] if tokenizer.model_max_length < 10**9 else []
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
    return min(limits) if limits else 512


# --------------------------------------------------------------------------- synthesize


def synthesize(
    loaded: LoadedModel,
    text: str,
    speaker: Any = None,
    *,
    max_new_tokens: int | None = None,
    seed: int | None = None,
) -> Audio:
    """Speech for ``text`` at the model's own sample rate.

    ``speaker``: SpeechT5, a list of ``speaker_embedding_dim`` floats (default: the packaged
    embedding, see ``runtime.speaker``); Bark, a voice preset name the model ships; VITS, a
    speaker id for multi-speaker models; Tacotron2, none (one speaker). ``max_new_tokens``
    caps Bark's semantic tokens (its audio length). ``seed`` seeds torch's global generator
    for this request only: VITS draws its noise from a per-request ``torch.Generator``; the
    families that sample inside ``generate`` (Bark) run with the global generator forked,
    seeded and restored under a lock. The same seed gives the same audio, also when other
    requests run at the same time.
    """
    if not loaded.is_tts:
        raise InvalidInput(
            f"Model {loaded.name!r} is a {loaded.task} model, not text-to-speech: use predict"
        )
    text = _text(text, "text", loaded.max_text_chars)
    if max_new_tokens is not None:
        _int_param({"max_new_tokens": max_new_tokens}, "max_new_tokens", None, 1, 4096)
    return adapter_for(loaded.family).synthesize(loaded, text, speaker, max_new_tokens, seed)


def speak_one(
    loaded: LoadedModel, run: Callable[[nn.Module], torch.Tensor], seed: int | None
) -> Audio:
    """One synthesis under the model's lock with the request's seed (``run(model)`` returns
    the waveform): the one-at-a-time path of the families that do not batch."""
    with _using(loaded) as model, _seeded_global_rng(seed, _device(model)):
        wave = run(model)
    return _audio(loaded, wave)


def _audio(loaded: LoadedModel, wave: torch.Tensor) -> Audio:
    samples = wave.detach().float().reshape(-1).cpu().numpy().astype(np.float32)
    assert loaded.sample_rate is not None
    return Audio(samples, loaded.sample_rate)


# Models that sample from torch's global generator (Bark's generate) take this lock, seeded
# or not, so a seeded request's draws are not interleaved with another model's.
_GLOBAL_RNG_LOCK = threading.Lock()


@contextlib.contextmanager
def _seeded_global_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run with torch's global generator seeded by ``seed`` (when given), restored after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(int(seed))
        yield


def _speecht5(loaded: LoadedModel, model: nn.Module, text: str, speaker: Any) -> torch.Tensor:
    dim = int(loaded.extra["speaker_embedding_dim"])
    if speaker is None:
        embedding = loaded.extra["default_speaker"]
    else:
        embedding = parse_speaker_embedding(speaker, dim)
    ids = loaded.processor(text=text, return_tensors="pt")["input_ids"]
    limit = int(loaded.extra["max_text_positions"])
    if ids.shape[1] > limit:
        raise InputTooLong(
            f"text is {ids.shape[1]} tokens; this model takes at most {limit} (its "
            f"max_text_positions). {LONG_TEXTS}",
            param="text",
        )
    device, dtype = _device(model), _float_dtype(model)
    speaker_tensor = torch.from_numpy(np.asarray(embedding))[None].to(device, dtype)
    return model.generate_speech(
        ids.to(device), speaker_embeddings=speaker_tensor, vocoder=loaded.vocoder
    )


def _bark(
    loaded: LoadedModel, model: nn.Module, text: str, speaker: Any, max_new_tokens: int | None
) -> torch.Tensor:
    presets = loaded.extra.get("voice_presets") or []
    if speaker is not None and (not isinstance(speaker, str) or speaker not in presets):
        offered = ", ".join(presets) if presets else "none (this model ships no presets)"
        raise InvalidInput(f"speaker must be one of this Bark model's voice presets: {offered}")
    _check_bark_length(loaded, text)
    inputs = loaded.processor(text, voice_preset=speaker)
    device = _device(model)
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items() if v is not None}
    kwargs = {"semantic_max_new_tokens": max_new_tokens} if max_new_tokens else {}
    return model.generate(**batch, **kwargs)


def _check_bark_length(loaded: LoadedModel, text: str) -> None:
    """Refuse a text longer than Bark's processor takes: it cuts the tokens at its
    ``max_length`` (256) without a word, and the speech would end mid-text."""
    tokenizer = loaded.processor.tokenizer
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokens > BARK_MAX_TOKENS:
        raise InputTooLong(
            f"text is {tokens} tokens; Bark speaks at most {BARK_MAX_TOKENS} in one request "
            f"(its processor would cut the rest). {LONG_TEXTS}",
            param="text",
        )


@dataclass(frozen=True)
class VitsCall:
    """One VITS request, checked: its text, speaker id and seed (None: a random one)."""

    text: str
    speaker: int | None
    seed: int


def _vits_call(loaded: LoadedModel, text: str, speaker: Any, seed: int | None) -> VitsCall:
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
    return VitsCall(_text(text, "text", loaded.max_text_chars), speaker, int(seed) % 2**64)


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
    processor = _processor(loaded)
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
    with _using(loaded) as model:
        waves = _vits_forward(loaded, model, ids, mask, calls[0].speaker, generators, lengths)
    return [_audio(loaded, wave) for wave in waves]


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
    if loaded.optimized or _device(model).type != "cpu" or _float_dtype(model) != torch.float32:
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
    device = _device(model)
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
    spectrogram = output.waveform.to(_float_dtype(decoder))
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


def _tacotron2(loaded: LoadedModel, model: nn.Module, text: str, speaker: Any) -> torch.Tensor:
    if speaker is not None:
        raise InvalidInput("this Tacotron2 model has a single speaker: omit speaker")
    if not any("a" <= c <= "z" for c in text.lower()):
        # It reads letters and punctuation only; digits are not spelled out.
        raise InvalidInput("the text has no characters this model reads (English letters)")
    tokens, lengths = loaded.processor(text)
    device = _device(model)
    spectrogram, frames, _ = model.infer(tokens.to(device), lengths.to(device))
    assert loaded.vocoder is not None
    waveform, _ = loaded.vocoder(spectrogram, frames)
    return waveform[0]


def speak_generated(
    text_model: LoadedModel,
    tts_model: LoadedModel,
    text: str,
    speaker: Any = None,
    *,
    max_new_tokens: int | None = None,
    seed: int | None = None,
) -> tuple[str, Audio]:
    """A two-model pipeline: ``text_model`` generates text from ``text`` (greedy,
    ``max_new_tokens``), then ``tts_model`` speaks what it generated. Returns both."""
    if text_model.family not in (Family.TEXT2TEXT, Family.TEXT_GENERATION):
        raise InvalidInput(
            f"Model {text_model.name!r} is a {text_model.task} model: a speak_with pipeline "
            "needs a text generation model"
        )
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens or DEFAULT_NEW_TOKENS}
    if text_model.family is Family.TEXT_GENERATION:
        params["return_full_text"] = False
    generated = str(predict(text_model, text, params)["generated_text"]).strip()
    if not generated:
        raise InvalidInput(f"Model {text_model.name!r} generated no text to speak")
    return generated, synthesize(tts_model, generated, speaker, seed=seed)


# --------------------------------------------------------------------------- predict


def predict(
    loaded: LoadedModel, inputs: Any, parameters: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Task-shaped results for ``inputs`` (the shape of Hugging Face's inference API).

    - text-classification: ``inputs`` a string or list; ``{"predictions": [{label, score}]}``
      sorted by score (a list of such lists for a list); ``top_k`` parameter.
    - feature-extraction: a string or list; ``{"embeddings": [[...]], "dimension": n}``;
      ``normalize`` parameter (unit L2 norm).
    - text-generation / text2text-generation: a string; ``{"generated_text": ...}``;
      ``max_new_tokens`` (default 32), ``do_sample``, ``temperature``, ``top_p``, ``top_k``,
      ``return_full_text`` (causal LMs, default true).
    - automatic-speech-recognition: base64 WAV, ``{"audio": base64}`` or
      ``{"samples": [floats], "sampling_rate": n}``; ``{"text": ...}``.
    - tensor (TorchScript): a nested list of numbers (or ``{"tensor": ...}``), one float32
      input; ``{"outputs": nested list, "shape": [...]}`` (a list of those for tuple outputs).
    - image-classification: base64 image, ``{"image": base64}`` or ``{"pixels": HxWx3}``;
      ``{"predictions": [{label, score, class_id}]}``, ``top_k`` (default 5).
    """
    params = dict(parameters or {})
    handler = adapter_for(loaded.family).predict
    if handler is None:
        raise InvalidInput(f"Model {loaded.name!r} is text-to-speech: use synthesize")
    with _using(loaded) as model:
        return handler(loaded, model, inputs, params)


def _ranked(probs: torch.Tensor, labels: dict[int, str], top_k: int | None) -> list[dict]:
    order = torch.argsort(probs, descending=True).tolist()
    if top_k is not None:
        order = order[:top_k]
    return [
        {"label": labels.get(i, f"LABEL_{i}"), "score": float(probs[i]), "class_id": i}
        for i in order
    ]


def _classify_text(loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
    texts, single = _texts(inputs, loaded.max_text_chars)
    results = _classify_rows(loaded, model, texts, _top_k(loaded, params))
    return {"predictions": results[0] if single else results}


def _top_k(loaded: LoadedModel, params: Mapping[str, Any]) -> int | None:
    labels = loaded.extra.get("labels") or {}
    return _int_param(params, "top_k", None, 1, max(1, len(labels)))


def _classify_rows(
    loaded: LoadedModel, model: nn.Module, texts: list[str], top_k: int | None
) -> list[list[dict]]:
    """Ranked labels for each text (one padded, masked forward for all of them)."""
    labels = loaded.extra.get("labels") or {}
    logits = model(**_encode(loaded, model, texts)).logits.float()
    if getattr(model.config, "problem_type", None) == "multi_label_classification":
        probs = torch.sigmoid(logits)
    else:
        probs = torch.softmax(logits, dim=-1)
    return [_ranked(row, labels, top_k) for row in probs.cpu()]


def _encode(
    loaded: LoadedModel, model: nn.Module, texts: list[str], max_length: int | None = None
) -> dict[str, Any]:
    """A padded, truncated batch of ``texts`` on the model's device (at most ``max_length``
    tokens each when given, and never more than the model takes)."""
    tokenizer = loaded.processor
    limit = _max_length(tokenizer, model.config)
    enc = tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=min(limit, max_length) if max_length else limit,
        return_tensors="pt",
    )
    return _to(enc, _device(model))


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: Sequence[str]) -> torch.Tensor:
    """Token vectors pooled into one vector per row by each of ``modes`` (``cls``, ``max``,
    ``mean``, ``mean_sqrt_len``), concatenated in that order as sentence-transformers does."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    pooled = []
    for mode in modes:
        if mode == "cls":
            pooled.append(hidden[:, 0])
        elif mode == "max":
            # Padding must never win the max: sentence-transformers sets it to -1e9 too.
            pooled.append(hidden.masked_fill(weights == 0, -1e9).max(dim=1).values)
        elif mode == "mean":
            pooled.append((hidden * weights).sum(dim=1) / counts)
        elif mode == "mean_sqrt_len":
            pooled.append((hidden * weights).sum(dim=1) / counts.sqrt())
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(pooled, dim=1)


def _normalize_param(params: Mapping[str, Any]) -> bool:
    normalize = params.get("normalize", False)
    if not isinstance(normalize, bool):
        raise InvalidInput("parameter normalize must be true or false")
    return normalize


def _embed(loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
    texts, _single = _texts(inputs, loaded.max_text_chars)
    matrix = _embedding_matrix(loaded, model, texts, _normalize_param(params))
    return {"embeddings": matrix.tolist(), "dimension": int(matrix.shape[1])}


def embedding_layout(loaded: LoadedModel) -> SentenceLayout:
    """How a feature-extraction model pools (plain encoders: mean pooling, nothing else)."""
    return loaded.extra.get("layout") or SentenceLayout()


def encode_for_embedding(loaded: LoadedModel, model: nn.Module, texts: list[str]) -> dict:
    """``texts`` tokenized as the model's layout reads them (casing, sequence length)."""
    layout = embedding_layout(loaded)
    if layout.do_lower_case:
        texts = [text.lower() for text in texts]
    return _encode(loaded, model, texts, layout.max_seq_length)


def _embedding_matrix(
    loaded: LoadedModel, model: nn.Module, texts: list[str], normalize: bool
) -> torch.Tensor:
    """One row per text: pooled over its own tokens (padding masked), on the CPU.

    A sentence-transformers layout (``loaded.extra["layout"]``) says how: its pooling modes,
    its Normalize module, its sequence length and casing; any other encoder is mean-pooled."""
    if loaded.extra.get("backend") == "sentence-transformers":
        vectors = model.encode(
            texts,
            batch_size=max(32, len(texts)),
            convert_to_numpy=True,
            normalize_embeddings=normalize,
            show_progress_bar=False,
        )
        return torch.from_numpy(np.asarray(vectors, dtype=np.float32))
    layout = embedding_layout(loaded)
    enc = encode_for_embedding(loaded, model, texts)
    hidden = model(**enc).last_hidden_state
    matrix = pool(hidden, enc["attention_mask"], layout.pooling).float().cpu()
    if normalize or layout.normalize:
        matrix = torch.nn.functional.normalize(matrix, p=2, dim=1)
    return matrix


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class TextsCall:
    """One predict request on a text model, checked: its texts and whether it sent one."""

    texts: list[str]
    single: bool


def predict_work(
    loaded: LoadedModel, inputs: Any, parameters: Mapping[str, Any] | None = None
) -> tuple[Work, Any]:
    """``predict`` as work for the model's worker, and the batch function of its group.

    The family's adapter says how a request batches (``predict_batch``, asked only when its
    ``batching.predict`` is on); otherwise the request runs alone."""
    params = dict(parameters or {})

    def alone() -> dict[str, Any]:
        return predict(loaded, inputs, params)

    adapter = adapter_for(loaded.family)
    plan = adapter.predict_batch(loaded, inputs, params) if adapter.batching.predict else None
    if plan is None:
        return Work(alone), None
    return Work(plan.run_one or alone, plan.group, plan.items, plan.payload), plan.run


def classification_batch(loaded: LoadedModel, inputs: Any, params: dict) -> BatchPlan:
    """Text classification's batch plan: one forward over every caller's texts."""
    top_k = _top_k(loaded, params)
    texts, single = _texts(inputs, loaded.max_text_chars)

    def classify(calls: Sequence[TextsCall]) -> list[Any]:
        with _using(loaded) as model:
            rows = _classify_rows(loaded, model, [t for c in calls for t in c.texts], top_k)
        parts = _split(calls, rows, lambda part, c: part[0] if c.single else part)
        return [{"predictions": part} for part in parts]

    return BatchPlan(("text-classification", top_k), len(texts), TextsCall(texts, single), classify)


def embedding_batch(loaded: LoadedModel, inputs: Any, params: dict) -> BatchPlan:
    """Embeddings' batch plan: one forward, mean pooling masked to each text's tokens."""
    normalize = _normalize_param(params)
    texts, single = _texts(inputs, loaded.max_text_chars)

    def embed(calls: Sequence[TextsCall]) -> list[Any]:
        with _using(loaded) as model:
            flat = [t for c in calls for t in c.texts]
            matrix = _embedding_matrix(loaded, model, flat, normalize)
        dimension = int(matrix.shape[1])
        rows = matrix.tolist()
        return _split(calls, rows, lambda part, c: {"embeddings": part, "dimension": dimension})

    return BatchPlan(("feature-extraction", normalize), len(texts), TextsCall(texts, single), embed)


def _split(calls: Sequence[TextsCall], rows: list[Any], shape: Any) -> list[Any]:
    """Each call's own slice of a batch's rows, shaped by ``shape(part, call)``."""
    out, start = [], 0
    for call in calls:
        part = rows[start : start + len(call.texts)]
        start += len(call.texts)
        out.append(shape(part, call))
    return out


def synthesize_work(
    loaded: LoadedModel,
    text: str,
    speaker: Any = None,
    *,
    max_new_tokens: int | None = None,
    seed: int | None = None,
) -> tuple[Work, Any]:
    """``synthesize`` as work for the model's worker: batched as the family's adapter says
    (``synthesize_batch``, when its ``batching.synthesize`` is on), otherwise alone."""

    def alone() -> Audio:
        return synthesize(loaded, text, speaker, max_new_tokens=max_new_tokens, seed=seed)

    adapter = adapter_for(loaded.family)
    plan = None
    if adapter.batching.synthesize:
        plan = adapter.synthesize_batch(loaded, text, speaker, seed)
    if plan is None:
        return Work(alone), None
    return Work(plan.run_one or alone, plan.group, plan.items, plan.payload), plan.run


def vits_batch_plan(loaded: LoadedModel, text: str, speaker: Any, seed: int | None) -> BatchPlan:
    """VITS's batch plan: one group per speaker id; alone, the same path with one item."""
    call = _vits_call(loaded, text, speaker, seed)
    return BatchPlan(
        ("vits", call.speaker),
        1,
        call,
        lambda calls: vits_batch(loaded, calls),
        run_one=lambda: vits_batch(loaded, [call])[0],
    )


def _generation_kwargs(params: dict) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": _int_param(params, "max_new_tokens", DEFAULT_NEW_TOKENS, 1, 4096)
    }
    if kwargs["max_new_tokens"] > MAX_NEW_TOKENS:
        raise InvalidInput(f"parameter max_new_tokens must be at most {MAX_NEW_TOKENS}")
    do_sample = params.get("do_sample", False)
    if not isinstance(do_sample, bool):
        raise InvalidInput("parameter do_sample must be true or false")
    kwargs["do_sample"] = do_sample
    for key, low, high in (("temperature", 1e-4, 100.0), ("top_p", 1e-4, 1.0)):
        if key in params:
            value = params[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInput(f"parameter {key} must be a number")
            if not (low <= float(value) <= high) or not math.isfinite(value):
                raise InvalidInput(f"parameter {key} must be from {low} to {high}")
            kwargs[key] = float(value)
    top_k = _int_param(params, "top_k", None, 1, 100_000)
    if top_k is not None:
        kwargs["top_k"] = top_k
    return kwargs


def _generate(loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
    text = _text(inputs, "inputs", loaded.max_text_chars)
    kwargs = _generation_kwargs(params)
    tokenizer = loaded.processor
    limit = _max_length(tokenizer, model.config)
    causal = loaded.family is Family.TEXT_GENERATION
    enc = tokenizer(text, return_tensors="pt", truncation=not causal, max_length=limit)
    length = int(enc["input_ids"].shape[1])
    if causal and length + kwargs["max_new_tokens"] > limit:
        raise InvalidInput(
            f"prompt ({length} tokens) plus max_new_tokens ({kwargs['max_new_tokens']}) "
            f"exceeds this model's {limit} positions"
        )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.eos_token_id
    output = model.generate(**_to(enc, _device(model)), **kwargs)
    if not causal:
        return {"generated_text": tokenizer.decode(output[0], skip_special_tokens=True)}
    new_text = tokenizer.decode(output[0, length:], skip_special_tokens=True)
    full = params.get("return_full_text", True)
    if not isinstance(full, bool):
        raise InvalidInput("parameter return_full_text must be true or false")
    return {"generated_text": text + new_text if full else new_text}


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


def _transcribe(loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
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
    features = features.to(_device(model), _float_dtype(model))
    kwargs: dict[str, Any] = {}
    room = max(1, decoder_room(model.config))
    max_new = _int_param(params, "max_new_tokens", None, 1, room)
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


def _classify_image(loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
    labels = loaded.extra.get("labels") or {}
    top_k = _int_param(params, "top_k", min(5, max(1, len(labels))), 1, max(1, len(labels)))
    image = decode_image(inputs)
    pixels = pixel_values(loaded.processor, image).to(_device(model), _float_dtype(model))
    logits = model(pixel_values=pixels).logits.float()
    probs = torch.softmax(logits, dim=-1)[0].cpu()
    return {"predictions": _ranked(probs, labels, top_k)}


def _run_tensors(loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
    """A TorchScript module on one float32 tensor built from nested lists."""
    if isinstance(inputs, dict):
        inputs = inputs.get("tensor")
    try:
        tensor = torch.tensor(inputs, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidInput(
            f"inputs must be a nested list of numbers for a TorchScript model: {exc}"
        ) from exc
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        try:
            output = model(tensor.to(device))
        except RuntimeError as exc:
            raise InvalidInput(
                f"the model rejected a tensor of shape {list(tensor.shape)}: "
                f"{str(exc).splitlines()[0]}"
            ) from exc

    def shaped(value: Any) -> dict:
        return {"outputs": value.cpu().tolist(), "shape": list(value.shape)}

    if isinstance(output, torch.Tensor):
        return shaped(output)
    return {"outputs": [shaped(item) for item in output]}


def _classify_torchvision(loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
    """Top-k ImageNet-style labels from a torchvision classifier and its weights' transforms."""
    from modelhost.runtime.images import decode_image

    image = decode_image(inputs)  # H x W x 3, uint8
    tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    batch = loaded.processor(tensor).unsqueeze(0).to(_device(model))
    with torch.no_grad():
        probs = model(batch).softmax(-1)[0].float().cpu()
    categories = loaded.extra.get("categories") or []
    labels = {i: name for i, name in enumerate(categories)} or {
        i: str(i) for i in range(probs.numel())
    }
    top_k = _int_param(params, "top_k", min(5, probs.numel()), 1, probs.numel())
    return {"predictions": _ranked(probs, labels, top_k)}
