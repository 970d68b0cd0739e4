"""Embeddings: one vector per text, pooled over its own tokens as the model's layout says
(a sentence-transformers layout, or mean pooling for a plain encoder), alone or in one
batch for every caller."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from modelhost.runtime.compute.inputs import check_texts
from modelhost.runtime.compute.model import using
from modelhost.runtime.compute.text_batch import TextsCall, encode_texts, split_rows
from modelhost.runtime.errors import InvalidInput
from modelhost.runtime.families.base import BatchPlan
from modelhost.runtime.loaded import LoadedModel
from modelhost.runtime.sentence_layout import SentenceLayout


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: Sequence[str]) -> torch.Tensor:
    """Token vectors pooled into one vector per row by each of ``modes`` (``cls``, ``max``,
    ``mean``, ``mean_sqrt_len``), concatenated in that order as sentence-transformers does."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    pooled = []
    for mode in modes:
        if mode == "cls":
            pooled.append(hidden[:, 0])
        elif mode == "max":
            # Padding must never win the max: sentence-transformers sets it to -1e9 too.
            pooled.append(hidden.masked_fill(weights == 0, -1e9).max(dim=1).values)
        elif mode == "mean":
            pooled.append((hidden * weights).sum(dim=1) / counts)
        elif mode == "mean_sqrt_len":
            pooled.append((hidden * weights).sum(dim=1) / counts.sqrt())
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(pooled, dim=1)


def normalize_param(params: Mapping[str, Any]) -> bool:
    """The ``normalize`` parameter (unit L2 norm), false unless given."""
    normalize = params.get("normalize", False)
    if not isinstance(normalize, bool):
        raise InvalidInput("parameter normalize must be true or false")
    return normalize


def embed(loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
    """``predict``: ``{"embeddings": [[...]], "dimension": n}``, one row per text."""
    texts, _single = check_texts(inputs, loaded.max_text_chars)
    matrix = embedding_matrix(loaded, model, texts, normalize_param(params))
    return {"embeddings": matrix.tolist(), "dimension": int(matrix.shape[1])}


def embedding_layout(loaded: LoadedModel) -> SentenceLayout:
    """How a feature-extraction model pools (plain encoders: mean pooling, nothing else)."""
    return loaded.extra.get("layout") or SentenceLayout()


def encode_for_embedding(loaded: LoadedModel, model: nn.Module, texts: list[str]) -> dict:
    """``texts`` tokenized as the model's layout reads them (casing, sequence length)."""
    layout = embedding_layout(loaded)
    if layout.do_lower_case:
        texts = [text.lower() for text in texts]
    return encode_texts(loaded, model, texts, layout.max_seq_length)


def embedding_matrix(
    loaded: LoadedModel, model: nn.Module, texts: list[str], normalize: bool
) -> torch.Tensor:
    """One row per text: pooled over its own tokens (padding masked), on the CPU.

    A sentence-transformers layout (``loaded.extra["layout"]``) says how: its pooling modes,
    its Normalize module, its sequence length and casing; any other encoder is mean-pooled."""
    if loaded.extra.get("backend") == "sentence-transformers":
        vectors = model.encode(
            texts,
            batch_size=max(32, len(texts)),
            convert_to_numpy=True,
            normalize_embeddings=normalize,
            show_progress_bar=False,
        )
        return torch.from_numpy(np.asarray(vectors, dtype=np.float32))
    layout = embedding_layout(loaded)
    enc = encode_for_embedding(loaded, model, texts)
    hidden = model(**enc).last_hidden_state
    matrix = pool(hidden, enc["attention_mask"], layout.pooling).float().cpu()
    if normalize or layout.normalize:
        matrix = torch.nn.functional.normalize(matrix, p=2, dim=1)
    return matrix


def embedding_batch(loaded: LoadedModel, inputs: Any, params: dict) -> BatchPlan:
    """Embeddings' batch plan: one forward, mean pooling masked to each text's tokens."""
    normalize = normalize_param(params)
    texts, single = check_texts(inputs, loaded.max_text_chars)

    def run(calls: Sequence[TextsCall]) -> list[Any]:
        with using(loaded) as model:
            flat = [t for c in calls for t in c.texts]
            matrix = embedding_matrix(loaded, model, flat, normalize)
        dimension = int(matrix.shape[1])
        rows = matrix.tolist()
        return split_rows(calls, rows, lambda part, c: {"embeddings": part, "dimension": dimension})

    return BatchPlan(("feature-extraction", normalize), len(texts), TextsCall(texts, single), run)
