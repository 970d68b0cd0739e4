"""Whisper transcription for OpenAI's ``/v1/audio/transcriptions``: text, language, and
segments with their times.

Generation follows the transformers ASR pipeline (which follows OpenAI's whisper): beam
search of 5 and at most 256 new tokens unless the model's generation config says otherwise,
never more than the decoder has room for (``max_target_positions`` less the start tokens and
the prompt: small checkpoints have 64);
a ``temperature`` above 0 samples instead. Segments come from Whisper's timestamp tokens
(``return_timestamps``) when the model's vocabulary has them; a model without them (the
tiny test model) gets one segment spanning the whole clip.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from modelhost.runtime.compute.model import device_of, float_dtype, using
from modelhost.runtime.errors import InvalidInput
from modelhost.runtime.families.vocabulary import Family
from modelhost.runtime.loaded import LoadedModel
from modelhost.runtime.whisper_decoder import decoder_room

TIMESTAMP_TOKENS = 1501  # <|0.00|> ... <|30.00|>, every 20 ms
PIPELINE_DEFAULTS = {"num_beams": 5, "max_new_tokens": 256}


@dataclass(frozen=True)
class TranscribeOptions:
    """What the caller asked for (already checked for type and range)."""

    language: str | None = None  # a code ("en") or name ("english"); None: detected
    prompt: str | None = None  # text the speech continues (Whisper's previous-text prompt)
    temperature: float = 0.0  # 0: beam search; above: sampling at that temperature
    segments: bool = False  # timed segments and the language wanted (verbose_json, srt, vtt)


@dataclass(frozen=True)
class Segment:
    """A stretch of the transcript and where it is in the audio, in seconds."""

    start: float
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)

    @property
    def compression_ratio(self) -> float:
        """The text's bytes over their zlib size (Whisper's repetition check)."""
        raw = self.text.encode("utf-8")
        return len(raw) / len(zlib.compress(raw)) if raw else 0.0


@dataclass(frozen=True)
class Transcript:
    text: str
    duration: float
    language: str | None  # the language's name ("english"), when asked for segments
    segments: list[Segment]
    timestamped: bool  # segments from timestamp tokens (False: one segment, the clip)


def is_whisper(loaded: LoadedModel) -> bool:
    return loaded.family is Family.WHISPER


def has_timestamps(model: Any) -> bool:
    """Whether the model's vocabulary has Whisper's timestamp tokens after <|notimestamps|>."""
    no_ts = getattr(model.generation_config, "no_timestamps_token_id", None)
    return no_ts is not None and model.config.vocab_size >= no_ts + 1 + TIMESTAMP_TOKENS


def transcribe(loaded: LoadedModel, samples: np.ndarray, options: TranscribeOptions) -> Transcript:
    """Transcribe mono float32 ``samples`` at the model's input rate (at most 30 s).
    Blocking: call it on the model's worker."""
    rate = int(loaded.extra["input_sample_rate"])
    with using(loaded) as model:
        processor = loaded.processor  # read under the lock: an unload may have released it
        features = processor.feature_extractor(
            samples, sampling_rate=rate, return_tensors="pt", return_attention_mask=True
        )
        device, dtype = device_of(model), float_dtype(model)
        inputs = {
            "input_features": features.input_features.to(device, dtype),
            "attention_mask": features.attention_mask.to(device),
        }
        timestamps = options.segments and has_timestamps(model)
        kwargs = _generation_kwargs(model, processor, options, timestamps)
        try:
            tokens = model.generate(**inputs, **kwargs)[0].cpu()
        except ValueError as exc:  # a language this checkpoint does not know
            raise InvalidInput(str(exc), param="language" if options.language else None) from exc
        language = options.language
        if options.segments and language is None:
            # What generate detected (the same call), not passed back in: a language given
            # to generate also adds the task token, which changes the transcript.
            language = _detect_language(model, processor, inputs["input_features"])
        return _transcript(loaded, tokens, len(samples) / rate, language, timestamps)


def _generation_kwargs(
    model: Any, processor: Any, options: TranscribeOptions, ts: bool
) -> dict[str, Any]:
    """The pipeline's defaults for what the model's generation config does not set."""
    own = model.generation_config.to_diff_dict()
    kwargs: dict[str, Any] = {}
    if options.temperature > 0:
        kwargs.update(do_sample=True, temperature=options.temperature, num_beams=1)
    elif "num_beams" not in own:
        kwargs["num_beams"] = PIPELINE_DEFAULTS["num_beams"]
    if options.language is not None:
        kwargs["language"] = options.language
    prompt_tokens = 0
    if options.prompt:
        kwargs["prompt_ids"] = processor.get_prompt_ids(options.prompt, return_tensors="pt").to(
            device_of(model)
        )
        prompt_tokens = int(kwargs["prompt_ids"].shape[-1])
    wanted = own.get("max_new_tokens")
    if wanted is None and "max_length" not in own:  # (generate caps max_length itself)
        wanted = PIPELINE_DEFAULTS["max_new_tokens"]
    if wanted is not None:
        kwargs["max_new_tokens"] = _capped_new_tokens(model, int(wanted), prompt_tokens)
    if ts:
        kwargs["return_timestamps"] = True
    return kwargs


def _capped_new_tokens(model: Any, wanted: int, prompt_tokens: int) -> int:
    """``wanted`` new tokens, at most what the decoder has room for after its start tokens
    and the prompt (generate refuses more than ``max_target_positions`` in all)."""
    room = decoder_room(model.config, prompt_tokens)
    if room < 1:
        raise InvalidInput(
            f"the prompt is {prompt_tokens} tokens; this model's decoder holds "
            f"{model.config.max_target_positions} tokens in all: shorten the prompt",
            param="prompt",
        )
    return min(wanted, room)


def _detect_language(model: Any, processor: Any, features: torch.Tensor) -> str:
    """The language code Whisper hears ("en"); English for an English-only model."""
    if not getattr(model.generation_config, "is_multilingual", False):
        return "en"
    token_id = int(model.detect_language(input_features=features)[0])
    token = processor.tokenizer.convert_ids_to_tokens(token_id)
    return token.strip("<|>")


def language_name(language: str | None) -> str | None:
    """``"en"`` / ``"<|en|>"`` / ``"English"`` -> ``"english"`` (OpenAI's verbose_json)."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    if language is None:
        return None
    key = language.strip("<|>").lower()
    return LANGUAGES.get(key, key)


def _transcript(
    loaded: LoadedModel,
    tokens: torch.Tensor,
    duration: float,
    language: str | None,
    ts: bool,
) -> Transcript:
    """Text and segments as the transformers ASR pipeline decodes them (its own
    ``_decode_asr``: the same text, the same chunks, also for partial UTF-8 bytes)."""
    tokenizer = loaded.processor.tokenizer
    extractor = loaded.processor.feature_extractor
    precision = extractor.chunk_length / loaded.model.config.max_source_positions
    text, optional = tokenizer._decode_asr(
        [{"tokens": tokens[None]}],
        return_timestamps=ts,
        return_language=None,
        time_precision=precision,
    )
    text = str(text).strip()
    segments: list[Segment] = []
    for chunk in optional.get("chunks", []) if ts else []:
        # Times past the end of the clip (a model's guess) are cut to it.
        start, end = (
            duration if t is None else min(float(t), duration) for t in chunk["timestamp"]
        )
        segments.append(Segment(start, end, chunk["text"], []))
    if not segments:
        special = set(tokenizer.all_special_ids)
        ids = [t for t in tokens.tolist() if t not in special]
        segments, ts = [Segment(0.0, duration, text, ids)], False
    return Transcript(text, duration, language_name(language), segments, ts)
