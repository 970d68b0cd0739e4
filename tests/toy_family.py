"""A toy model family in one module: what adding a family to modelhost takes.

A model directory whose config.json says ``"model_type": "toy-doubler"`` holds one weight
(``model.safetensors``: ``weight``, shape 1x1); the family loads it into ``nn.Linear(1, 1)``
and its predict answers each number of ``inputs`` times that weight (2.0 doubles them).
Registered with one line: ``register(ToyAdapter())`` (or ``MODELHOST_FAMILIES``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.runtime.errors import InvalidInput
from modelhost.runtime.families import FamilyInfo
from modelhost.runtime.families.base import Adapter, DetectContext, LoadOptions, Parts

if TYPE_CHECKING:
    from torch import nn

    from modelhost.runtime.loaded import LoadedModel
    from modelhost.runtime.probes import Probe

MODEL_TYPE = "toy-doubler"


class ToyAdapter(Adapter):
    """Numbers in, each multiplied by the model's one weight out."""

    name = "toy-doubler"
    sized_as = None  # no Transformers class: the weights file's size is the estimate

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        if ctx.config.get("model_type") != MODEL_TYPE:
            return None
        return ctx.info(self.name, "doubling")

    def load(self, info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
        import torch
        from safetensors.torch import load_file

        layer = torch.nn.Linear(1, 1, bias=False)
        layer.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        return Parts(model=layer)

    def predict(self, loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
        import torch

        if not isinstance(inputs, list) or not inputs:
            raise InvalidInput("inputs must be a non-empty list of numbers")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in inputs):
            raise InvalidInput("inputs must be a non-empty list of numbers")
        column = torch.tensor(inputs, dtype=torch.float32).unsqueeze(-1)
        return {"outputs": model(column).squeeze(-1).tolist()}

    def probe(self, loaded: LoadedModel) -> Probe:
        import torch

        from modelhost.runtime.probes import Probe

        sample = torch.tensor([[1.0], [2.5], [-3.0], [10.0]])
        return Probe(lambda m, v: m(sample).float().cpu(), "toy: 4 numbers through it", 0.5)


def write_toy_model(directory: Path, factor: float = 2.0) -> Path:
    """A toy-doubler model directory (config.json and model.safetensors)."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": MODEL_TYPE}))
    save_file({"weight": torch.tensor([[factor]])}, str(directory / "model.safetensors"))
    return directory
