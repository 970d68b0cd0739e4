"""The waveform of one text for each built-in family that speaks one request at a time
(SpeechT5, Bark, Tacotron2): the family's own checks and limits, then its forward. Each runs
as ``speak_one``'s ``run``, under the model's lock."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from modelhost.errors import InputTooLong
from modelhost.runtime.compute.model import device_of, float_dtype
from modelhost.runtime.compute.speech import LONG_TEXTS
from modelhost.runtime.errors import InvalidInput
from modelhost.runtime.loaded import LoadedModel
from modelhost.runtime.speaker import parse_speaker_embedding

BARK_MAX_TOKENS = 256  # BarkProcessor's max_length: it truncates beyond it


def speecht5_waveform(
    loaded: LoadedModel, model: nn.Module, text: str, speaker: Any
) -> torch.Tensor:
    """SpeechT5 with the vocoder; ``speaker`` a speaker embedding (None: the packaged one)."""
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
    device, dtype = device_of(model), float_dtype(model)
    speaker_tensor = torch.from_numpy(np.asarray(embedding))[None].to(device, dtype)
    return model.generate_speech(
        ids.to(device), speaker_embeddings=speaker_tensor, vocoder=loaded.vocoder
    )


def bark_waveform(
    loaded: LoadedModel, model: nn.Module, text: str, speaker: Any, max_new_tokens: int | None
) -> torch.Tensor:
    """Bark; ``speaker`` one of the voice presets the model ships (None: unprompted)."""
    presets = loaded.extra.get("voice_presets") or []
    if speaker is not None and (not isinstance(speaker, str) or speaker not in presets):
        offered = ", ".join(presets) if presets else "none (this model ships no presets)"
        raise InvalidInput(f"speaker must be one of this Bark model's voice presets: {offered}")
    _check_bark_length(loaded, text)
    inputs = loaded.processor(text, voice_preset=speaker)
    device = device_of(model)
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


def tacotron2_waveform(
    loaded: LoadedModel, model: nn.Module, text: str, speaker: Any
) -> torch.Tensor:
    """Tacotron2 and its vocoder (one speaker: ``speaker`` must be None)."""
    if speaker is not None:
        raise InvalidInput("this Tacotron2 model has a single speaker: omit speaker")
    if not any("a" <= c <= "z" for c in text.lower()):
        # It reads letters and punctuation only; digits are not spelled out.
        raise InvalidInput("the text has no characters this model reads (English letters)")
    tokens, lengths = loaded.processor(text)
    device = device_of(model)
    spectrogram, frames, _ = model.infer(tokens.to(device), lengths.to(device))
    assert loaded.vocoder is not None
    waveform, _ = loaded.vocoder(spectrogram, frames)
    return waveform[0]
