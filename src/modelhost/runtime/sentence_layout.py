"""The sentence-transformers layout of an embedding model, read without sentence-transformers.

A sentence-transformers repository describes its pipeline in ``modules.json``: a Transformer
(the encoder, whose files sit at the top of the repository), then a Pooling module (how token
vectors become one vector, in ``1_Pooling/config.json``) and often a Normalize module. Those
three are what almost every published embedding model uses, and each is a few lines of torch,
so modelhost runs them itself: a plain ``pip install`` serves such models without the
``sentence-transformers`` package. A pipeline with any other module (Dense projections, custom
code) is served through ``sentence-transformers`` when it is installed, and refused naming the
``pip install`` otherwise (``unsupported_modules``).

Nothing here imports torch: this module only reads JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TRANSFORMER = "sentence_transformers.models.Transformer"
POOLING = "sentence_transformers.models.Pooling"
NORMALIZE = "sentence_transformers.models.Normalize"
NATIVE_MODULES = (TRANSFORMER, POOLING, NORMALIZE)

# The pooling modes modelhost computes, in the order sentence-transformers concatenates them.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len")
_MODE_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
}
# Modes sentence-transformers has and modelhost does not compute: such models need the package.
_OTHER_MODE_KEYS = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


class LayoutError(ValueError):
    """modules.json or a module's config cannot be read as a sentence-transformers layout."""


@dataclass(frozen=True)
class SentenceLayout:
    """What a sentence-transformers pipeline does, as modelhost runs it natively."""

    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    # Module types (or pooling modes) modelhost does not run itself; empty when it runs all.
    unsupported: tuple[str, ...] = ()

    @property
    def native(self) -> bool:
        """True when modelhost computes the whole pipeline without sentence-transformers."""
        return not self.unsupported


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LayoutError(f"cannot read {path.name}: {exc}") from exc


def _pooling_modes(config: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The pooling modes a Pooling config turns on, and those modelhost cannot compute."""
    modes = tuple(mode for mode in POOLING_MODES if config.get(_MODE_KEYS[mode]))
    other = tuple(key for key in _OTHER_MODE_KEYS if config.get(key))
    if config.get("include_prompt") is False:
        other += ("include_prompt=false",)
    if not modes and not other:
        other = ("a Pooling module with no pooling mode",)
    return modes, other


def read_layout(path: Path) -> SentenceLayout:
    """The layout of the sentence-transformers model in directory ``path`` (has modules.json)."""
    modules = _read_json(path / "modules.json")
    if not isinstance(modules, list):
        raise LayoutError("modules.json is not a list of modules")
    pooling: tuple[str, ...] = ()
    unsupported: list[str] = []
    normalize = False
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        if kind == POOLING:
            config = _read_json(path / str(module.get("path", "")) / "config.json")
            pooling, other = _pooling_modes(config if isinstance(config, dict) else {})
            unsupported.extend(other)
        elif kind == NORMALIZE:
            normalize = True
        elif kind != TRANSFORMER:
            unsupported.append(kind or "a module without a type")
    if not pooling and not unsupported:
        unsupported.append("no Pooling module")
    bert_config = path / "sentence_bert_config.json"
    settings = _read_json(bert_config) if bert_config.is_file() else {}
    settings = settings if isinstance(settings, dict) else {}
    max_seq = settings.get("max_seq_length")
    return SentenceLayout(
        pooling=pooling or ("mean",),
        normalize=normalize,
        max_seq_length=int(max_seq) if isinstance(max_seq, int) and max_seq > 0 else None,
        do_lower_case=bool(settings.get("do_lower_case", False)),
        unsupported=tuple(unsupported),
    )
