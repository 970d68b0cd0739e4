"""Whisper speech recognition (up to 30 s of audio)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.runtime.families.base import (
    Adapter,
    DetectContext,
    LoadOptions,
    Parts,
    SmokeRequest,
)
from modelhost.runtime.families.vocabulary import Family, FamilyInfo

if TYPE_CHECKING:  # annotations only: no torch on import
    from torch import nn

    from modelhost.runtime.loaded import LoadedModel
    from modelhost.runtime.probes import Probe


class WhisperAdapter(Adapter):
    """``WhisperForConditionalGeneration`` with its processor."""

    name = Family.WHISPER.value
    sized_as = "WhisperForConditionalGeneration"

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        # A text-to-speech task is answered by the "needs a SpeechT5, Bark or VITS" error.
        if not ctx.config or ctx.model_type != "whisper" or ctx.task == "text-to-speech":
            return None
        if ctx.task not in (None, "automatic-speech-recognition"):
            raise ctx.unsupported(f"a Whisper model serves speech recognition, not {ctx.task}")
        return ctx.info(Family.WHISPER, "automatic-speech-recognition")

    def load(self, info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
        return _load_parts(info, path, options)

    def predict(self, loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
        # runtime.compute imports torch: here, not at the module's top
        from modelhost.runtime.compute.transcribe import transcribe

        return transcribe(loaded, model, inputs, params)

    def probe(self, loaded: LoadedModel) -> Probe:
        return _probe(loaded)

    def smoke(self, loaded: LoadedModel) -> SmokeRequest:
        from modelhost.runtime.probes import tone

        rate = int(loaded.extra["input_sample_rate"])
        inputs = {"samples": tone(rate, 0.5).tolist(), "sampling_rate": rate}
        return SmokeRequest("predict", {"inputs": inputs, "parameters": {"max_new_tokens": 2}})


def _load_parts(info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from modelhost.runtime.pretrained import load_pretrained

    model = load_pretrained(WhisperForConditionalGeneration, path, options)
    processor = WhisperProcessor.from_pretrained(path, local_files_only=True)
    rate = int(processor.feature_extractor.sampling_rate)
    return Parts(model, processor, extra={"input_sample_rate": rate})


def _probe(loaded: LoadedModel) -> Probe:
    """First-token probabilities for two seconds of tones."""
    import torch

    from modelhost.runtime.probes import (
        PROBABILITY_TOLERANCE,
        Probe,
        float_dtype,
        probabilities,
        probe_parts,
        tone,
    )

    model, device, proc = probe_parts(loaded)
    rate = int(loaded.extra["input_sample_rate"])
    features = proc.feature_extractor(tone(rate), sampling_rate=rate, return_tensors="pt")
    feats = features.input_features.to(device)
    start = model.config.decoder_start_token_id
    decoder = torch.tensor([[start]], device=device)
    return Probe(
        lambda m, v: probabilities(
            m(input_features=feats.to(float_dtype(m)), decoder_input_ids=decoder).logits
        ),
        "first-token probabilities for 2 s of tones",
        PROBABILITY_TOLERANCE,
    )
