"""Image classification: a ``*ForImageClassification`` checkpoint and its labels."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.runtime.families.base import (
    Adapter,
    DetectContext,
    LoadOptions,
    Parts,
    SmokeRequest,
)
from modelhost.runtime.families.vocabulary import Family, FamilyInfo, has_suffix

if TYPE_CHECKING:  # annotations only: no torch on import
    from torch import nn

    from modelhost.runtime.loaded import LoadedModel
    from modelhost.runtime.probes import Probe


log = logging.getLogger(__name__)


class ImageClassificationAdapter(Adapter):
    """Labels and scores for an image (base64 or pixels)."""

    name = Family.IMAGE_CLASSIFICATION.value
    sized_as = "AutoModelForImageClassification"

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        if not ctx.config or ctx.resolved_task != "image-classification":
            return None
        if not has_suffix(ctx.architectures, "ForImageClassification"):
            raise ctx.unsupported("the checkpoint has no image-classification head")
        return ctx.info(Family.IMAGE_CLASSIFICATION, "image-classification")

    def load(self, info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
        return _load_parts(info, path, options)

    def predict(self, loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
        # runtime.compute imports torch: here, not at the module's top
        from modelhost.runtime.compute.image_classification import classify_image

        return classify_image(loaded, model, inputs, params)

    def probe(self, loaded: LoadedModel) -> Probe:
        return _probe(loaded)

    def smoke(self, loaded: LoadedModel) -> SmokeRequest:
        pixels = [[[0, 128, 255]] * 8] * 8
        return SmokeRequest("predict", {"inputs": {"pixels": pixels}, "parameters": {}})


def _load_parts(info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
    from transformers import AutoModelForImageClassification

    from modelhost.runtime.images import ConfigPreprocessor
    from modelhost.runtime.pretrained import load_pretrained

    model = load_pretrained(AutoModelForImageClassification, path, options)
    processor: Any
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        kind = "transformers"
    except (ImportError, OSError, ValueError) as exc:
        # Transformers' image processors need Pillow or torchvision.
        log.info("image processor of %s unavailable (%s); using its config", path, exc)
        image_size = getattr(model.config, "image_size", None)
        processor = ConfigPreprocessor.from_model_dir(path, image_size)
        kind = "config"
    labels = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    return Parts(model, processor, extra={"labels": labels, "image_processor": kind})


def _probe(loaded: LoadedModel) -> Probe:
    """Class probabilities of a fixed noise image."""
    import torch

    from modelhost.runtime.images import pixel_values
    from modelhost.runtime.probes import (
        PROBABILITY_TOLERANCE,
        Probe,
        float_dtype,
        probabilities,
        probe_parts,
    )

    model, device, proc = probe_parts(loaded)
    generator = torch.Generator().manual_seed(0)
    side = int(getattr(model.config, "image_size", 224) or 224)
    image = torch.randint(0, 256, (side, side, 3), generator=generator, dtype=torch.uint8)
    pixels = pixel_values(proc, image.numpy()).to(device)
    return Probe(
        lambda m, v: probabilities(m(pixel_values=pixels.to(float_dtype(m))).logits),
        "class probabilities of a noise image",
        PROBABILITY_TOLERANCE,
    )
