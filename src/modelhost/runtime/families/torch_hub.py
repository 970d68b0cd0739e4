"""An allow-listed PyTorch Hub repository's entrypoint (``load_as "torch_hub:<name>"``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.runtime.families import Family, FamilyInfo
from modelhost.runtime.families.base import Adapter, DetectContext, LoadOptions, Parts
from modelhost.store.manifest import Manifest

if TYPE_CHECKING:  # annotations only: no torch on import
    from torch import nn

    from modelhost.runtime.loaded import LoadedModel


class TorchHubAdapter(Adapter):
    """``torch.hub.load`` of the installed snapshot; tensors in, out."""

    name = Family.TORCH_HUB.value

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        if not ctx.load_as.startswith("torch_hub:"):
            return None
        entrypoint = ctx.load_as.split(":", 1)[1]
        return FamilyInfo(Family.TORCH_HUB, "tensor", entrypoint, (), {})

    def check_weights(self, manifest: Manifest, path: Path, allow_pickle: bool) -> bool:
        # The repository's code builds its own weights: there is no weights file to check.
        return True

    def load(self, info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
        from modelhost.runtime.loaders import _torch_hub

        return _torch_hub(info, path, {})

    def predict(self, loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
        from modelhost.runtime.inference import _run_tensors

        return _run_tensors(loaded, model, inputs, params)
