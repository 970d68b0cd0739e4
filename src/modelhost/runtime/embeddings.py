"""Embeddings with the tokens they cost: the batch plan of OpenAI's ``/v1/embeddings``.

The same forward as ``predict`` on a feature-extraction model
(``compute.embedding.embedding_matrix``: one padded, masked forward over every queued
caller's texts on the model's worker), and
each text's token count from the model's own tokenizer, truncated as the model truncates,
so ``usage.prompt_tokens`` is what was embedded. It is its own batch group: its callers'
results carry token counts, which ``predict``'s do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from modelhost.runtime.compute.embedding import embedding_matrix, encode_for_embedding
from modelhost.runtime.compute.inputs import check_texts
from modelhost.runtime.compute.model import using
from modelhost.runtime.compute.text_batch import TextsCall
from modelhost.runtime.families.base import BatchPlan
from modelhost.runtime.families.vocabulary import Family
from modelhost.runtime.loaded import LoadedModel


@dataclass(frozen=True)
class EmbeddingRows:
    """One caller's embeddings (float32, one row per text) and each text's token count."""

    vectors: np.ndarray
    tokens: list[int]


def embeds(loaded: LoadedModel) -> bool:
    """Whether ``loaded`` is an embedding (feature-extraction) model."""
    return loaded.family is Family.FEATURE_EXTRACTION


def normalizes(loaded: LoadedModel) -> bool:
    """Whether the vectors are L2-normalized here: a sentence-transformers model gives its
    own pipeline's output (all-MiniLM-L6-v2 ends in a Normalize module); a plain encoder's
    mean-pooled vectors are normalized, as OpenAI's embeddings are."""
    return loaded.extra.get("backend") not in ("sentence-transformers", "sentence-layout")


def dimension(loaded: LoadedModel) -> int | None:
    """The embedding size the model declares (None when it does not say)."""
    model = loaded.model
    if model is None:
        return None
    if loaded.extra.get("backend") == "sentence-transformers":
        getter = getattr(model, "get_embedding_dimension", None) or getattr(
            model, "get_sentence_embedding_dimension", None
        )
        return int(getter()) if getter and getter() else None
    size = getattr(model.config, "hidden_size", None)
    return int(size) if isinstance(size, int) else None


def token_counts(loaded: LoadedModel, model: torch.nn.Module, texts: list[str]) -> list[int]:
    """Each text's tokens as the model reads it (special tokens in, truncated at its
    limit); call with the model's lock held (tokenizers keep per-call state)."""
    if loaded.extra.get("backend") == "sentence-transformers":
        preprocess = getattr(model, "preprocess", None) or model.tokenize
        mask = preprocess(texts)["attention_mask"]
    else:
        mask = encode_for_embedding(loaded, model, texts)["attention_mask"]
    return [int(n) for n in mask.sum(dim=1).tolist()]


def embeddings_batch(loaded: LoadedModel, texts: list[str]) -> BatchPlan:
    """The batch plan of one request's ``texts`` (at most ``compute.inputs.MAX_BATCH``): every
    caller's texts in one forward, each caller's rows and token counts back."""
    normalize = normalizes(loaded)
    texts, single = check_texts(texts, loaded.max_text_chars)

    def run(calls: Sequence[TextsCall]) -> list[EmbeddingRows]:
        flat = [t for c in calls for t in c.texts]
        with using(loaded) as model:
            matrix = embedding_matrix(loaded, model, flat, normalize)
            tokens = token_counts(loaded, model, flat)
        vectors = matrix.numpy().astype(np.float32, copy=False)
        out, start = [], 0
        for call in calls:
            end = start + len(call.texts)
            out.append(EmbeddingRows(vectors[start:end], tokens[start:end]))
            start = end
        return out

    call = TextsCall(texts, single)
    return BatchPlan(
        ("openai-embeddings", normalize), len(texts), call, run, run_one=lambda: run([call])[0]
    )
