"""A torchaudio Tacotron2 text-to-speech bundle (``load_as "torchaudio:<bundle>"``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.runtime.families import Family, FamilyInfo
from modelhost.runtime.families.base import Adapter, DetectContext, LoadOptions, Parts

if TYPE_CHECKING:  # annotations only: no torch on import
    import torch
    from torch import nn

    from modelhost.runtime.loaded import LoadedModel


class Tacotron2Adapter(Adapter):
    """Tacotron2 + WaveRNN (or Griffin-Lim), one speaker, English letters."""

    name = Family.TACOTRON2.value

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        if not ctx.load_as.startswith("torchaudio:"):
            return None
        bundle = ctx.load_as.split(":", 1)[1]
        return FamilyInfo(Family.TACOTRON2, "text-to-speech", bundle, (), {})

    def load(self, info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
        from modelhost.runtime.loaders import _tacotron2

        return _tacotron2(info, path, {})

    def synthesize(
        self,
        loaded: LoadedModel,
        model: nn.Module,
        text: str,
        speaker: Any,
        max_new_tokens: int | None,
    ) -> torch.Tensor:
        from modelhost.runtime.inference import _tacotron2

        return _tacotron2(loaded, model, text, speaker)
