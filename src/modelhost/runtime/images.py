"""Images for image classification: decoding requests and turning them into pixel values.

Encoded images (PNG, JPEG, ... as base64) need Pillow. Raw pixels (``{"pixels": [[[r, g,
b], ...], ...]}``, height x width x channels, 0-255) need nothing. Preprocessing uses the
model's own Transformers image processor when one can be built (it needs Pillow or
torchvision); otherwise ``ConfigPreprocessor`` applies ``preprocessor_config.json``
(resize, center crop, rescale, normalise) with torch alone.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from modelhost.runtime.errors import InvalidInput
from modelhost.runtime.wav import decode_base64

MAX_PIXELS = 50_000_000


def decode_image(value: Any) -> np.ndarray:
    """An RGB uint8 array (H, W, 3) from a base64 image, ``{"image": b64}`` or
    ``{"pixels": nested list}``."""
    if isinstance(value, dict):
        if "pixels" in value:
            return _pixels(value["pixels"])
        if "image" in value:
            value = value["image"]
        else:
            raise InvalidInput('image input must be base64, {"image": base64} or {"pixels": ...}')
    if not isinstance(value, str):
        raise InvalidInput("image input must be a base64-encoded image string")
    data = decode_base64(value, "image")
    try:
        from PIL import Image
    except ImportError as exc:
        raise InvalidInput(
            "decoding encoded images needs Pillow, which is not installed on this server; "
            'install pillow, or send raw pixels as {"pixels": [[[r, g, b], ...], ...]}'
        ) from exc
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise InvalidInput(f"image is too large ({image.width}x{image.height})")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except InvalidInput:
        raise
    except Exception as exc:  # Pillow raises many kinds for bad data
        raise InvalidInput(f"cannot decode the image: {exc}") from exc


def _pixels(value: Any) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"pixels must be a height x width x 3 array of numbers: {exc}") from exc
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise InvalidInput(f"pixels must be height x width x 3 (RGB), got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    array = array[:, :, :3]
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise InvalidInput("pixel values must be numbers from 0 to 255")
    return np.round(array).astype(np.uint8)


@dataclass(frozen=True)
class ConfigPreprocessor:
    """``preprocessor_config.json`` applied with torch: resize, center crop, rescale,
    normalise, the steps ViT-, DeiT-, ResNet- and ConvNeXt-style processors take."""

    size: dict[str, int]
    crop_size: dict[str, int] | None
    crop_pct: float | None
    rescale_factor: float
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_model_dir(cls, path: Path, image_size: int | None) -> ConfigPreprocessor:
        config_path = Path(path) / "preprocessor_config.json"
        data: dict[str, Any] = {}
        if config_path.is_file():
            data = json.loads(config_path.read_text("utf-8"))
        size = data.get("size") or image_size or 224
        if isinstance(size, int):
            size = {"height": size, "width": size}
        crop = data.get("crop_size") if data.get("do_center_crop") else None
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        return cls(
            size=dict(size),
            crop_size=dict(crop) if crop else None,
            crop_pct=data.get("crop_pct"),
            rescale_factor=float(data.get("rescale_factor", 1 / 255)),
            image_mean=tuple(data.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(data.get("image_std", (0.5, 0.5, 0.5))),
            do_resize=bool(data.get("do_resize", True)),
            do_rescale=bool(data.get("do_rescale", True)),
            do_normalize=bool(data.get("do_normalize", True)),
        )

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """(1, 3, H, W) float32 pixel values for one RGB uint8 image."""
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        if self.do_resize:
            tensor = F.interpolate(
                tensor, size=self._resize_to(tensor.shape[-2:]), mode="bilinear",
                align_corners=False, antialias=True,
            )  # fmt: skip
        if self.crop_size:
            tensor = _center_crop(tensor, self.crop_size["height"], self.crop_size["width"])
        elif self.crop_pct and "shortest_edge" in self.size:
            edge = int(self.size["shortest_edge"])
            tensor = _center_crop(tensor, edge, edge)
        if self.do_rescale:
            tensor = tensor * self.rescale_factor
        if self.do_normalize:
            mean = torch.tensor(self.image_mean).view(1, -1, 1, 1)
            std = torch.tensor(self.image_std).view(1, -1, 1, 1)
            tensor = (tensor - mean) / std
        return tensor

    def _resize_to(self, shape: torch.Size) -> tuple[int, int]:
        height, width = int(shape[0]), int(shape[1])
        if "height" in self.size and "width" in self.size:
            return self.size["height"], self.size["width"]
        edge = int(self.size.get("shortest_edge", 224))
        if self.crop_pct:  # ConvNeXt: resize to edge / crop_pct, then crop to edge
            edge = int(edge / self.crop_pct)
        scale = edge / min(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))


def _center_crop(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    top = max(0, (tensor.shape[-2] - height) // 2)
    left = max(0, (tensor.shape[-1] - width) // 2)
    return tensor[..., top : top + height, left : left + width]


def pixel_values(processor: Any, image: np.ndarray) -> torch.Tensor:
    """Pixel values for ``image`` with the model's processor (HF or ``ConfigPreprocessor``)."""
    if isinstance(processor, ConfigPreprocessor):
        return processor(image)
    return processor(images=image, return_tensors="pt")["pixel_values"]
