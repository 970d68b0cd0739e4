"""SpeechT5 text to speech: spectrograms from the model, audio from its HiFiGAN vocoder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.runtime.families.base import Adapter, DetectContext, LoadOptions, Parts
from modelhost.runtime.families.vocabulary import Family, FamilyInfo, vocoder_path

if TYPE_CHECKING:  # annotations only: no torch on import
    import torch
    from torch import nn

    from modelhost.runtime.loaded import LoadedModel
    from modelhost.runtime.probes import Probe
    from modelhost.runtime.wav import Audio


class SpeechT5Adapter(Adapter):
    """``SpeechT5ForTextToSpeech`` with the vocoder component installed beside it."""

    name = Family.SPEECHT5.value
    sized_as = "SpeechT5ForTextToSpeech"

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        if not ctx.config or ctx.model_type != "speecht5":
            return None
        if ctx.task not in (None, "text-to-speech"):
            raise ctx.unsupported(f"a speecht5 model serves text-to-speech, not {ctx.task}")
        if ctx.architectures and "SpeechT5ForTextToSpeech" not in ctx.architectures:
            raise ctx.unsupported("only SpeechT5ForTextToSpeech checkpoints make speech")
        vocoder = vocoder_path(ctx.manifest, ctx.path)
        if vocoder is None or not (vocoder / "config.json").is_file():
            raise ctx.unsupported(
                "SpeechT5 makes spectrograms and needs its HiFiGAN vocoder: install the "
                "model with include_vocoder (the vocoder lives in <model>/vocoder/)"
            )
        return ctx.info(Family.SPEECHT5, "text-to-speech", vocoder_path=vocoder)

    def config_size(self, info: FamilyInfo, path: Path, device_type: str) -> tuple[int, int]:
        from modelhost.runtime.sizing import config_size

        parameters, nbytes = super().config_size(info, path, device_type)
        if info.vocoder_path is None:
            return parameters, nbytes
        vocoder = config_size(info.vocoder_path, device_type, "SpeechT5HifiGan")
        return parameters + vocoder[0], nbytes + vocoder[1]

    def load(self, info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
        return _load_parts(info, path, options.hf_kwargs())

    def synthesize(
        self,
        loaded: LoadedModel,
        text: str,
        speaker: Any,
        max_new_tokens: int | None,
        seed: int | None,
    ) -> Audio:
        # runtime.compute imports torch: here, not at the module's top
        from modelhost.runtime.compute.speech import speak_one
        from modelhost.runtime.compute.waveforms import speecht5_waveform

        return speak_one(loaded, lambda m: speecht5_waveform(loaded, m, text, speaker), seed)

    def voices(self, loaded: LoadedModel) -> list[str]:
        """Voice "default" (the packaged embedding, ``runtime.speaker``) and the x-vectors the
        model ships as ``speaker_embeddings/<name>.npy``."""
        return ["default", *sorted(loaded.extra.get("speaker_voices", {}))]

    def speaker_for_voice(self, loaded: LoadedModel, voice: str) -> Any:
        return loaded.extra.get("speaker_voices", {}).get(voice)

    def probe(self, loaded: LoadedModel) -> Probe:
        return _probe(loaded)


def _load_parts(info: FamilyInfo, path: Path, kw: dict[str, Any]) -> Parts:
    from transformers import SpeechT5ForTextToSpeech, SpeechT5HifiGan, SpeechT5Processor

    from modelhost.runtime.speaker import default_speaker_embedding, shipped_speakers

    assert info.vocoder_path is not None  # detect_family guarantees it
    model = SpeechT5ForTextToSpeech.from_pretrained(path, **kw)
    processor = SpeechT5Processor.from_pretrained(path, local_files_only=True)
    vocoder = SpeechT5HifiGan.from_pretrained(info.vocoder_path, **kw)
    dim = int(model.config.speaker_embedding_dim)
    return Parts(
        model,
        processor,
        vocoder=vocoder,
        sample_rate=int(vocoder.config.sampling_rate),
        extra={
            "speaker_embedding_dim": dim,
            "default_speaker": default_speaker_embedding(dim),
            "max_text_positions": int(model.config.max_text_positions),
            "speaker_voices": shipped_speakers(path, dim),
        },
    )


def _probe(loaded: LoadedModel) -> Probe:
    """The vocoder's waveform of a teacher-forced 16-frame spectrogram."""
    import numpy as np
    import torch

    from modelhost.runtime.probes import (
        AUDIO_TOLERANCE,
        SAMPLE_TEXTS,
        Probe,
        float_dtype,
        probe_parts,
    )

    model, device, proc = probe_parts(loaded)
    ids = proc(text=SAMPLE_TEXTS[1], return_tensors="pt")["input_ids"].to(device)
    speaker = torch.from_numpy(np.asarray(loaded.extra["default_speaker"]))[None]
    frames = torch.zeros(1, 16, int(model.config.num_mel_bins))

    def run_speecht5(m: nn.Module, v: nn.Module | None) -> torch.Tensor:
        dtype = float_dtype(m)
        out = m(
            input_ids=ids,
            speaker_embeddings=speaker.to(device, dtype),
            decoder_input_values=frames.to(device, dtype),
        ).spectrogram
        assert v is not None
        return v(out[0].to(float_dtype(v))).float().cpu()

    return Probe(
        run_speecht5,
        "waveform of a teacher-forced 16-frame spectrogram through the vocoder",
        AUDIO_TOLERANCE,
        relative=True,
    )
