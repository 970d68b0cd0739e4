"""Text generation (causal LMs and text2text): the generation parameters, checked, and one
prompt's generated text."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from modelhost.runtime.compute.inputs import check_text, int_param
from modelhost.runtime.compute.model import device_of, to_device
from modelhost.runtime.compute.text_batch import max_length
from modelhost.runtime.errors import InvalidInput
from modelhost.runtime.families.vocabulary import Family
from modelhost.runtime.loaded import LoadedModel

MAX_NEW_TOKENS = 1024
DEFAULT_NEW_TOKENS = 32


def generation_kwargs(params: dict) -> dict[str, Any]:
    """``generate``'s keyword arguments from a request's parameters, each checked."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": int_param(params, "max_new_tokens", DEFAULT_NEW_TOKENS, 1, 4096)
    }
    if kwargs["max_new_tokens"] > MAX_NEW_TOKENS:
        raise InvalidInput(f"parameter max_new_tokens must be at most {MAX_NEW_TOKENS}")
    do_sample = params.get("do_sample", False)
    if not isinstance(do_sample, bool):
        raise InvalidInput("parameter do_sample must be true or false")
    kwargs["do_sample"] = do_sample
    for key, low, high in (("temperature", 1e-4, 100.0), ("top_p", 1e-4, 1.0)):
        if key in params:
            value = params[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInput(f"parameter {key} must be a number")
            if not (low <= float(value) <= high) or not math.isfinite(value):
                raise InvalidInput(f"parameter {key} must be from {low} to {high}")
            kwargs[key] = float(value)
    top_k = int_param(params, "top_k", None, 1, 100_000)
    if top_k is not None:
        kwargs["top_k"] = top_k
    return kwargs


def generate(loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
    """``predict``: ``{"generated_text": ...}`` for one prompt (a causal LM's answer with or
    without the prompt, as ``return_full_text`` says)."""
    text = check_text(inputs, "inputs", loaded.max_text_chars)
    kwargs = generation_kwargs(params)
    tokenizer = loaded.processor
    limit = max_length(tokenizer, model.config)
    causal = loaded.family is Family.TEXT_GENERATION
    enc = tokenizer(text, return_tensors="pt", truncation=not causal, max_length=limit)
    length = int(enc["input_ids"].shape[1])
    if causal and length + kwargs["max_new_tokens"] > limit:
        raise InvalidInput(
            f"prompt ({length} tokens) plus max_new_tokens ({kwargs['max_new_tokens']}) "
            f"exceeds this model's {limit} positions"
        )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.eos_token_id
    output = model.generate(**to_device(enc, device_of(model)), **kwargs)
    if not causal:
        return {"generated_text": tokenizer.decode(output[0], skip_special_tokens=True)}
    new_text = tokenizer.decode(output[0, length:], skip_special_tokens=True)
    full = params.get("return_full_text", True)
    if not isinstance(full, bool):
        raise InvalidInput("parameter return_full_text must be true or false")
    return {"generated_text": text + new_text if full else new_text}
