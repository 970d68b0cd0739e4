"""Bark text to audio: semantic, coarse and fine models, voice presets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.runtime.families import Family, FamilyInfo
from modelhost.runtime.families.base import (
    Adapter,
    DetectContext,
    LoadOptions,
    Parts,
)

if TYPE_CHECKING:  # annotations only: no torch on import
    import torch
    from torch import nn

    from modelhost.runtime.loaded import LoadedModel
    from modelhost.runtime.probes import Probe


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
        from modelhost.runtime.loaders import _bark

        return _bark(info, path, options.hf_kwargs())

    def synthesize(
        self,
        loaded: LoadedModel,
        model: nn.Module,
        text: str,
        speaker: Any,
        max_new_tokens: int | None,
    ) -> torch.Tensor:
        from modelhost.runtime.inference import _bark

        return _bark(loaded, model, text, speaker, max_new_tokens)

    def probe(self, loaded: LoadedModel) -> Probe:
        from modelhost.runtime.probes import bark_probe

        return bark_probe(loaded)
