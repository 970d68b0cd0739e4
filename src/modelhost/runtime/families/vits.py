"""VITS / MMS-TTS text to speech (one or several speakers)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.runtime.errors import UnsupportedModel
from modelhost.runtime.families.base import (
    Adapter,
    BatchPlan,
    BatchSupport,
    DetectContext,
    LoadOptions,
    Parts,
)
from modelhost.runtime.families.vocabulary import Family, FamilyInfo

if TYPE_CHECKING:  # annotations only: no torch on import
    import torch
    from torch import nn

    from modelhost.runtime.loaded import LoadedModel
    from modelhost.runtime.probes import Probe
    from modelhost.runtime.wav import Audio


class VitsAdapter(Adapter):
    """A ``VitsModel`` checkpoint (its config's model_type is vits)."""

    name = Family.VITS.value
    sized_as = "VitsModel"
    batching = BatchSupport(synthesize=True)

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        if not ctx.config or ctx.model_type != "vits":
            return None
        if ctx.task not in (None, "text-to-speech"):
            raise ctx.unsupported(f"a vits model serves text-to-speech, not {ctx.task}")
        return ctx.info(Family.VITS, "text-to-speech")

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
        from modelhost.runtime.compute.vits import vits_batch, vits_call

        # One item through the batch path: its noise from its own seeded generator.
        audio = vits_batch(loaded, [vits_call(loaded, text, speaker, seed)])[0]
        if isinstance(audio, Exception):
            raise audio
        return audio

    def synthesize_batch(
        self, loaded: LoadedModel, text: str, speaker: Any, seed: int | None
    ) -> BatchPlan:
        # runtime.compute imports torch: here, not at the module's top
        from modelhost.runtime.compute.vits import vits_batch_plan

        return vits_batch_plan(loaded, text, speaker, seed)

    def voices(self, loaded: LoadedModel) -> list[str]:
        """Speaker ids "0" .. "N-1" (config.num_speakers); "default" for one speaker."""
        speakers = int(loaded.extra.get("num_speakers", 1))
        return [str(i) for i in range(speakers)] if speakers > 1 else ["default"]

    def speaker_for_voice(self, loaded: LoadedModel, voice: str) -> Any:
        return int(voice) if voice.isdigit() else None

    def probe(self, loaded: LoadedModel) -> Probe:
        return _probe(loaded)


def _load_parts(info: FamilyInfo, path: Path, kw: dict[str, Any]) -> Parts:
    from transformers import AutoTokenizer, VitsModel

    model = VitsModel.from_pretrained(path, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if getattr(tokenizer, "is_uroman", False):
        raise UnsupportedModel(
            f"{path.name}: this VITS tokenizer needs text romanised with uroman first, "
            "which the server does not do yet"
        )
    speakers = int(getattr(model.config, "num_speakers", 1) or 1)
    return Parts(
        model,
        tokenizer,
        sample_rate=int(model.config.sampling_rate),
        extra={"num_speakers": speakers},
    )


def _probe(loaded: LoadedModel) -> Probe:
    """The waveform of a sentence, the same noise seed for both models."""
    import torch

    from modelhost.runtime.probes import (
        AUDIO_TOLERANCE,
        SAMPLE_TEXTS,
        Probe,
        on_device,
        probe_parts,
    )

    _, device, proc = probe_parts(loaded)
    enc = on_device(dict(proc(SAMPLE_TEXTS[1], return_tensors="pt")), device)

    def run_vits(m: nn.Module, v: nn.Module | None) -> torch.Tensor:
        torch.manual_seed(0)  # VITS draws noise; the same noise for both models
        return m(**enc).waveform.float().cpu()

    return Probe(run_vits, "waveform of a sentence (same noise seed)", AUDIO_TOLERANCE, True)
