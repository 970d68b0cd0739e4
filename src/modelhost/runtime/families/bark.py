"""Bark text to audio: semantic, coarse and fine models, voice presets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.runtime.families.base import (
    Adapter,
    DetectContext,
    LoadOptions,
    Parts,
)
from modelhost.runtime.families.vocabulary import Family, FamilyInfo

if TYPE_CHECKING:  # annotations only: no torch on import
    from modelhost.runtime.loaded import LoadedModel
    from modelhost.runtime.probes import Probe
    from modelhost.runtime.wav import Audio


class BarkAdapter(Adapter):
    """A ``BarkModel`` checkpoint (its config's model_type is bark)."""

    name = Family.BARK.value
    sized_as = "BarkModel"

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        if not ctx.config or ctx.model_type != "bark":
            return None
        if ctx.task not in (None, "text-to-speech"):
            raise ctx.unsupported(f"a bark model serves text-to-speech, not {ctx.task}")
        return ctx.info(Family.BARK, "text-to-speech")

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
        from modelhost.runtime.compute.waveforms import bark_waveform

        return speak_one(
            loaded, lambda m: bark_waveform(loaded, m, text, speaker, max_new_tokens), seed
        )

    def voices(self, loaded: LoadedModel) -> list[str]:
        """Voice "default" (no preset: Bark's unprompted voice) and the shipped presets."""
        return ["default", *loaded.extra.get("voice_presets", [])]

    def speaker_for_voice(self, loaded: LoadedModel, voice: str) -> Any:
        return None if voice == "default" else voice

    def probe(self, loaded: LoadedModel) -> Probe:
        return _probe(loaded)


def _load_parts(info: FamilyInfo, path: Path, kw: dict[str, Any]) -> Parts:
    from transformers import BarkModel, BarkProcessor

    model = BarkModel.from_pretrained(path, **kw)
    presets_file = "speaker_embeddings_path.json"
    processor = BarkProcessor.from_pretrained(
        path,
        speaker_embeddings_dict_path=presets_file if (path / presets_file).is_file() else None,
        local_files_only=True,
    )
    presets = sorted(processor.available_voice_presets) if processor.speaker_embeddings else []
    rate = getattr(model.generation_config, "sample_rate", None)
    if rate is None:  # the codec's own rate, when generation_config.json did not record it
        rate = model.config.codec_config.sampling_rate
    return Parts(model, processor, sample_rate=int(rate), extra={"voice_presets": presets})


def _probe(loaded: LoadedModel) -> Probe:
    """The semantic model's next-token probabilities."""
    from modelhost.runtime.probes import (
        PROBABILITY_TOLERANCE,
        SAMPLE_TEXTS,
        Probe,
        probabilities,
        probe_parts,
    )

    _, device, proc = probe_parts(loaded)
    ids = proc(SAMPLE_TEXTS[1])["input_ids"][:, :64].to(device)
    return Probe(
        lambda m, v: probabilities(m.semantic(input_ids=ids).logits),
        "semantic model next-token probabilities",
        PROBABILITY_TOLERANCE,
    )
