"""Sizing a model from its config.json before loading it: the architecture built on the meta
device (no memory), its parameters priced as the loaders load them.

Used by the family adapters' ``config_size`` (``sized_as``), which ``loaders.preflight``
asks before the registry reserves memory for a load; a config declaring an absurd
architecture is refused here, before anything is built.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from modelhost.runtime.errors import MalformedWeights, first_line

log = logging.getLogger(__name__)

# More layers than any real model has: building that many modules, even on the meta
# device, would take the server's time and memory before the budget could refuse it.
MAX_CONFIG_LAYERS = 10_000
_LAYER_KEYS = ("layers", "n_layer", "num_blocks")


def _config_error(path: Path, what: object) -> MalformedWeights:
    return MalformedWeights(
        f"{path.name}/config.json is not a valid model config: {what}. Reinstall the model, "
        "or fix its config.json"
    )


def _check_layer_counts(values: Any, path: Path) -> None:
    """Refuse a config (or nested sub-config) declaring an absurd number of layers."""
    if isinstance(values, dict):
        for key, value in values.items():
            if (
                isinstance(value, int)
                and any(k in str(key) for k in _LAYER_KEYS)
                and value > MAX_CONFIG_LAYERS
            ):
                raise _config_error(path, f"{key} is {value}, over {MAX_CONFIG_LAYERS}")
            _check_layer_counts(value, path)


def config_size(path: Path, device_type: str, class_name: str) -> tuple[int, int]:
    """Parameters and loaded bytes of the architecture ``path``/config.json declares: the
    model class built on the meta device (no memory), its parameters priced as the loaders
    load them (float32 off CUDA, the config's dtype on CUDA)."""
    import transformers

    cls = getattr(transformers, class_name)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # parsing only, no model code runs: any failure is the file's
        raise _config_error(path, first_line(exc)) from None
    _check_layer_counts(config.to_dict(), path)
    try:
        with torch.device("meta"):
            build = cls.from_config if cls.__name__.startswith("Auto") else cls._from_config
            model = build(config)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError,
            OverflowError, AssertionError) as exc:  # fmt: skip
        raise _config_error(path, f"{cls.__name__} cannot be built from it ({exc})") from None
    except Exception as exc:  # the architecture's code; not sizing it is safe, loading checks
        log.warning("could not size %s from its config on meta: %r", path, exc)
        return 0, 0
    stored = getattr(config, "dtype", None)  # transformers maps a saved torch_dtype here
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    float_size = (
        torch.empty((), dtype=stored).element_size()
        if (device_type == "cuda" and isinstance(stored, torch.dtype))
        else 4
    )
    parameters = nbytes = 0
    for tensor in model.parameters():  # shared (tied) parameters are yielded once
        parameters += tensor.numel()
        size = float_size if tensor.is_floating_point() else tensor.element_size()
        nbytes += tensor.numel() * size
    return parameters, nbytes
