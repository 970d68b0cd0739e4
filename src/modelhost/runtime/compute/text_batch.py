"""Texts as one batch: tokenized, padded and truncated within what the model takes, and
each caller's own rows of a batch that served several callers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from modelhost.runtime.compute.model import device_of, to_device
from modelhost.runtime.loaded import LoadedModel


@dataclass(frozen=True)
class TextsCall:
    """One predict request on a text model, checked: its texts and whether it sent one."""

    texts: list[str]
    single: bool


def max_length(tokenizer: Any, config: Any) -> int:
    """The longest input the model takes, in tokens."""
    limits = [int(tokenizer.model_max_length)] if tokenizer.model_max_length < 10**9 else []
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
    return min(limits) if limits else 512


def encode_texts(
    loaded: LoadedModel, model: nn.Module, texts: list[str], limit: int | None = None
) -> dict[str, Any]:
    """A padded, truncated batch of ``texts`` on the model's device (at most ``limit``
    tokens each when given, and never more than the model takes)."""
    tokenizer = loaded.processor
    longest = max_length(tokenizer, model.config)
    enc = tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=min(longest, limit) if limit else longest,
        return_tensors="pt",
    )
    return to_device(enc, device_of(model))


def split_rows(
    calls: Sequence[TextsCall], rows: list[Any], shape: Callable[[list[Any], TextsCall], Any]
) -> list[Any]:
    """Each call's own slice of a batch's rows, shaped by ``shape(part, call)``."""
    out, start = [], 0
    for call in calls:
        part = rows[start : start + len(call.texts)]
        start += len(call.texts)
        out.append(shape(part, call))
    return out
