"""SpeechT5 speaker embeddings: the packaged default and per-request ones.

SpeechT5 conditions its voice on a speaker x-vector (512 numbers for microsoft/speecht5_tts;
``config.speaker_embedding_dim`` in general). Real x-vectors come from a speaker-verification
model run on someone's recordings; none can be downloaded here, so the default is made
deterministically at run time: ``numpy.random.default_rng(DEFAULT_SPEAKER_SEED)``'s standard
normal vector of the model's dimension, scaled to unit L2 norm (x-vectors are
length-normalised). It is NOT a real voice's x-vector: it gives a stable, reproducible voice,
the same on every machine for the same dimension. Pass a real x-vector per request for a
real speaker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from modelhost.runtime.errors import InvalidInput

DEFAULT_SPEAKER_SEED = 7306


def default_speaker_embedding(dim: int) -> np.ndarray:
    """The documented default: a seeded unit-norm float32 vector of length ``dim``."""
    if dim <= 0:
        raise ValueError(f"speaker embedding dimension must be positive, not {dim}")
    vector = np.random.default_rng(DEFAULT_SPEAKER_SEED).standard_normal(dim)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def parse_speaker_embedding(value: object, dim: int) -> np.ndarray:
    """A per-request x-vector: a list of ``dim`` finite numbers, as float32."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray):
        raise InvalidInput(
            f"speaker must be a list of {dim} numbers (a SpeechT5 x-vector), "
            f"not {type(value).__name__}"
        )
    if len(value) != dim:
        raise InvalidInput(
            f"speaker embedding has {len(value)} values; this model expects {dim} "
            "(config.speaker_embedding_dim)"
        )
    try:
        numbers = [float(x) for x in value]
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"speaker embedding must contain only numbers: {exc}") from exc
    if not all(math.isfinite(x) for x in numbers):
        raise InvalidInput("speaker embedding must contain only finite numbers")
    return np.asarray(numbers, dtype=np.float32)


def shipped_speakers(path: Path, dim: int) -> dict[str, np.ndarray]:
    """The x-vectors a model ships as ``speaker_embeddings/<name>.npy`` (float arrays of
    ``dim`` values; others are skipped: they are not this model's speakers), by name."""
    found: dict[str, np.ndarray] = {}
    folder = Path(path) / "speaker_embeddings"
    if not folder.is_dir():
        return found
    for file in sorted(folder.glob("*.npy")):
        try:
            vector = np.load(file, allow_pickle=False)
        except (OSError, ValueError):
            continue
        if vector.dtype.kind == "f" and vector.size == dim and np.isfinite(vector).all():
            found[file.stem] = vector.reshape(-1).astype(np.float32)
    return found
