"""A torchvision architecture and a state dict for it (``load_as "torchvision:<name>"``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.runtime.families import Family, FamilyInfo
from modelhost.runtime.families.base import Adapter, DetectContext, LoadOptions, Parts

if TYPE_CHECKING:  # annotations only: no torch on import
    from torch import nn

    from modelhost.runtime.loaded import LoadedModel


class TorchvisionAdapter(Adapter):
    """Image classification with the architecture's weights-enum labels and transforms."""

    name = Family.TORCHVISION.value

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        if not ctx.load_as.startswith("torchvision:"):
            return None
        architecture = ctx.load_as.split(":", 1)[1]
        weights = {"weights": ctx.manifest.spec.weights}  # the enum member installed
        return FamilyInfo(Family.TORCHVISION, "image-classification", architecture, (), weights)

    def load(self, info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
        from modelhost.runtime.loaders import _torchvision

        return _torchvision(info, path, {})

    def predict(self, loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
        from modelhost.runtime.inference import _classify_torchvision

        return _classify_torchvision(loaded, model, inputs, params)
