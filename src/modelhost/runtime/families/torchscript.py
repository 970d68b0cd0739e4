"""TorchScript archives from the url source (``load_as "torchscript"``): tensors in, out."""

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


class TorchScriptAdapter(Adapter):
    """One .pt/.pth/.ptl TorchScript archive, run on a float32 tensor."""

    name = Family.TORCHSCRIPT.value

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        if ctx.load_as != "torchscript":
            return None
        return FamilyInfo(Family.TORCHSCRIPT, "tensor", None, (), {})

    def check_weights(self, manifest: Manifest, path: Path, allow_pickle: bool) -> bool:
        from modelhost.runtime.weights import check_pickle

        # torch.jit.load reads TorchScript code and tensors: no Python pickle runs.
        return check_pickle(manifest, path, allow_pickle)

    def load(self, info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
        return _load_parts(info, path, {})

    def predict(self, loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
        # runtime.compute imports torch: here, not at the module's top
        from modelhost.runtime.compute.tensors import run_tensors

        return run_tensors(loaded, model, inputs, params)


def _load_parts(info: FamilyInfo, path: Path, kwargs: dict[str, Any]) -> Parts:
    """A TorchScript archive: compiled TorchScript code and tensors, no Python pickles run."""
    import torch

    archives = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth", ".ptl"))
    if len(archives) != 1:
        raise UnsupportedModel(
            f"A TorchScript model is one .pt/.pth/.ptl file; found {len(archives)} in {path}"
        )
    try:
        module = torch.jit.load(str(archives[0]), map_location="cpu")
    except RuntimeError as exc:
        raise UnsupportedModel(f"{archives[0].name} is not a TorchScript archive: {exc}") from exc
    return Parts(model=module)
