"""Image classification: ranked labels for one image, from a Transformers classifier (its
image processor) or a torchvision one (its weights' transforms)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelhost.runtime.compute.inputs import int_param
from modelhost.runtime.compute.labels import ranked
from modelhost.runtime.compute.model import device_of, float_dtype
from modelhost.runtime.images import decode_image, pixel_values
from modelhost.runtime.loaded import LoadedModel


def classify_image(loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
    """``predict`` on a Transformers image classifier; ``top_k`` (default 5)."""
    labels = loaded.extra.get("labels") or {}
    top_k = int_param(params, "top_k", min(5, max(1, len(labels))), 1, max(1, len(labels)))
    image = decode_image(inputs)
    pixels = pixel_values(loaded.processor, image).to(device_of(model), float_dtype(model))
    logits = model(pixel_values=pixels).logits.float()
    probs = torch.softmax(logits, dim=-1)[0].cpu()
    return {"predictions": ranked(probs, labels, top_k)}


def classify_torchvision(loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
    """Top-k ImageNet-style labels from a torchvision classifier and its weights' transforms."""
    image = decode_image(inputs)  # H x W x 3, uint8
    tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    batch = loaded.processor(tensor).unsqueeze(0).to(device_of(model))
    with torch.no_grad():
        probs = model(batch).softmax(-1)[0].float().cpu()
    categories = loaded.extra.get("categories") or []
    labels = {i: name for i, name in enumerate(categories)} or {
        i: str(i) for i in range(probs.numel())
    }
    top_k = int_param(params, "top_k", min(5, probs.numel()), 1, probs.numel())
    return {"predictions": ranked(probs, labels, top_k)}
