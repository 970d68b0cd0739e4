"""A request's inputs, checked before any model runs: texts (non-empty, valid Unicode,
within the model's ``max_text_chars``) and integer parameters in range.

Imports no torch: the checks are plain Python.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelhost.errors import InputTooLong
from modelhost.runtime.errors import InvalidInput
from modelhost.runtime.loaded import DEFAULT_MAX_TEXT_CHARS

MAX_BATCH = 64  # texts in one request's list


def check_text(value: Any, what: str = "text", limit: int = DEFAULT_MAX_TEXT_CHARS) -> str:
    """``value`` as a text input of at most ``limit`` characters (the model's
    ``max_text_chars``): 400 for what is not text, 413 for a longer one."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{what} must be a non-empty string")
    try:
        value.encode("utf-8")  # tokenizers raise on lone surrogates
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"{what} is not valid Unicode text: a lone surrogate at character {exc.start}"
        ) from None
    if len(value) > limit:
        raise InputTooLong(
            f"{what} is {len(value):,} characters; one request takes at most {limit:,} "
            "(MODELHOST_MAX_INPUT_CHARS). Send shorter texts; to speak a long text use "
            "POST /v1/audio/speech (spoken sentence by sentence) or POST /v1/audio/speech/jobs",
            param=what.split("[")[0],
        )
    return value


def check_texts(value: Any, limit: int) -> tuple[list[str], bool]:
    """A string or a list of strings, and whether a single string was given."""
    if isinstance(value, str):
        return [check_text(value, "inputs", limit)], True
    if isinstance(value, list) and value:
        if len(value) > MAX_BATCH:
            raise InvalidInput(f"at most {MAX_BATCH} inputs per request, got {len(value)}")
        return [check_text(v, f"inputs[{i}]", limit) for i, v in enumerate(value)], False
    raise InvalidInput("inputs must be a non-empty string or a non-empty list of strings")


def int_param(params: Mapping[str, Any], key: str, default: int | None, low: int, high: int):
    """``params[key]`` (else ``default``) as an integer from ``low`` to ``high``; None when
    neither is given."""
    value = params.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"parameter {key} must be an integer from {low} to {high}")
    return value
