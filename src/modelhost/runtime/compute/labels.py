"""Class probabilities as ranked labels: the answer of every classification family."""

from __future__ import annotations

import torch


def ranked(probs: torch.Tensor, labels: dict[int, str], top_k: int | None) -> list[dict]:
    """``{label, score, class_id}`` per class, highest score first, at most ``top_k``."""
    order = torch.argsort(probs, descending=True).tolist()
    if top_k is not None:
        order = order[:top_k]
    return [
        {"label": labels.get(i, f"LABEL_{i}"), "score": float(probs[i]), "class_id": i}
        for i in order
    ]
