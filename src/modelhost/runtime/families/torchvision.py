"""A torchvision architecture and a state dict for it (``load_as "torchvision:<name>"``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.packages import missing_dependency
from modelhost.runtime.errors import UnsupportedModel
from modelhost.runtime.families.base import Adapter, DetectContext, LoadOptions, Parts
from modelhost.runtime.families.vocabulary import Family, FamilyInfo

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
        return _load_parts(info, path, {})

    def predict(self, loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
        # runtime.compute imports torch: here, not at the module's top
        from modelhost.runtime.compute.image_classification import classify_torchvision

        return classify_torchvision(loaded, model, inputs, params)


def _load_parts(info: FamilyInfo, path: Path, kwargs: dict[str, Any]) -> Parts:
    """A torchvision architecture built by name, then the state dict loaded strictly into it.

    Labels and preprocessing come from the architecture's default weights enum (metadata in
    torchvision's code, nothing downloaded)."""
    import torch

    try:
        import torchvision
    except ImportError as exc:
        raise missing_dependency(
            "torchvision", f"Loading {path.name} (a torchvision model)"
        ) from exc
    name = str(info.model_type)
    if name not in torchvision.models.list_models():
        raise UnsupportedModel(f"torchvision has no architecture {name!r}")
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt"))
    if len(files) != 1:
        raise UnsupportedModel(f"expected one weights file in {path}, found {len(files)}")
    if files[0].suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(files[0]))
    else:  # pickled: only reached with allow_pickle (check_pickle), and never runs code
        state = torch.load(files[0], map_location="cpu", weights_only=True)
    model = torchvision.models.get_model(name, weights=None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UnsupportedModel(
            f"{files[0].name} does not fit torchvision's {name}: {str(exc).splitlines()[0]}"
        ) from exc
    enum = torchvision.models.get_model_weights(name)
    member = info.config.get("weights")
    weights = enum[member] if member in enum.__members__ else enum.DEFAULT
    return Parts(
        model=model,
        processor=weights.transforms(),
        extra={"categories": list(weights.meta.get("categories") or [])},
    )
