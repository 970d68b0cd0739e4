"""``predict`` on a module that takes a plain tensor (TorchScript, torch hub): nested lists
of numbers in, nested lists out."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelhost.runtime.errors import InvalidInput
from modelhost.runtime.loaded import LoadedModel


def run_tensors(loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
    """A TorchScript module on one float32 tensor built from nested lists."""
    if isinstance(inputs, dict):
        inputs = inputs.get("tensor")
    try:
        tensor = torch.tensor(inputs, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidInput(
            f"inputs must be a nested list of numbers for a TorchScript model: {exc}"
        ) from exc
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        try:
            output = model(tensor.to(device))
        except RuntimeError as exc:
            raise InvalidInput(
                f"the model rejected a tensor of shape {list(tensor.shape)}: "
                f"{str(exc).splitlines()[0]}"
            ) from exc

    def shaped(value: Any) -> dict:
        return {"outputs": value.cpu().tolist(), "shape": list(value.shape)}

    if isinstance(output, torch.Tensor):
        return shaped(output)
    return {"outputs": [shaped(item) for item in output]}
