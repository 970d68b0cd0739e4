"""An allow-listed PyTorch Hub repository's entrypoint (``load_as "torch_hub:<name>"``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.runtime.errors import UnsupportedModel
from modelhost.runtime.families.base import Adapter, DetectContext, LoadOptions, Parts
from modelhost.runtime.families.vocabulary import Family, FamilyInfo
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
        return _load_parts(info, path, {})

    def predict(self, loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
        # runtime.compute imports torch: here, not at the module's top
        from modelhost.runtime.compute.tensors import run_tensors

        return run_tensors(loaded, model, inputs, params)


def _load_parts(info: FamilyInfo, path: Path, kwargs: dict[str, Any]) -> Parts:
    """``torch.hub.load`` of an installed repository snapshot (its hubconf.py runs: the
    pytorch_hub source admits only allow-listed repositories pinned to a ref)."""
    import torch

    if not (path / "hubconf.py").is_file():
        raise UnsupportedModel(f"{path} has no hubconf.py")
    try:
        module = torch.hub.load(str(path), str(info.model_type), source="local")
    except Exception as exc:  # the repository's own code: report what it raised
        raise UnsupportedModel(
            f"torch.hub.load of entrypoint {info.model_type!r} failed: {exc!r}"
        ) from exc
    if not isinstance(module, torch.nn.Module):
        raise UnsupportedModel(f"entrypoint {info.model_type!r} returned no torch.nn.Module")
    return Parts(model=module)
