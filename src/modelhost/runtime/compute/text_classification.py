"""Text classification: ranked labels per text, alone or in one batch for every caller."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from modelhost.runtime.compute.inputs import check_texts, int_param
from modelhost.runtime.compute.labels import ranked
from modelhost.runtime.compute.model import using
from modelhost.runtime.compute.text_batch import TextsCall, encode_texts, split_rows
from modelhost.runtime.families.base import BatchPlan
from modelhost.runtime.loaded import LoadedModel


def classify_text(loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
    """``predict``: ranked labels for a text (a list of those for a list of texts)."""
    texts, single = check_texts(inputs, loaded.max_text_chars)
    results = classify_rows(loaded, model, texts, top_k(loaded, params))
    return {"predictions": results[0] if single else results}


def top_k(loaded: LoadedModel, params: Mapping[str, Any]) -> int | None:
    """The ``top_k`` parameter, at most the model's number of labels (None: all of them)."""
    labels = loaded.extra.get("labels") or {}
    return int_param(params, "top_k", None, 1, max(1, len(labels)))


def classify_rows(
    loaded: LoadedModel, model: nn.Module, texts: list[str], top_k: int | None
) -> list[list[dict]]:
    """Ranked labels for each text (one padded, masked forward for all of them)."""
    labels = loaded.extra.get("labels") or {}
    logits = model(**encode_texts(loaded, model, texts)).logits.float()
    if getattr(model.config, "problem_type", None) == "multi_label_classification":
        probs = torch.sigmoid(logits)
    else:
        probs = torch.softmax(logits, dim=-1)
    return [ranked(row, labels, top_k) for row in probs.cpu()]


def classification_batch(loaded: LoadedModel, inputs: Any, params: dict) -> BatchPlan:
    """Text classification's batch plan: one forward over every caller's texts."""
    k = top_k(loaded, params)
    texts, single = check_texts(inputs, loaded.max_text_chars)

    def classify(calls: Sequence[TextsCall]) -> list[Any]:
        with using(loaded) as model:
            rows = classify_rows(loaded, model, [t for c in calls for t in c.texts], k)
        parts = split_rows(calls, rows, lambda part, c: part[0] if c.single else part)
        return [{"predictions": part} for part in parts]

    return BatchPlan(("text-classification", k), len(texts), TextsCall(texts, single), classify)
