"""Embeddings: a sentence-transformers layout, or any encoder mean-pooled."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.runtime.families import Family, FamilyInfo
from modelhost.runtime.families.base import (
    Adapter,
    BatchSupport,
    DetectContext,
    LoadOptions,
    Parts,
)

if TYPE_CHECKING:  # annotations only: no torch on import
    from torch import nn

    from modelhost.runtime.loaded import LoadedModel
    from modelhost.runtime.probes import Probe


class FeatureExtractionAdapter(Adapter):
    """One vector per input text."""

    name = Family.FEATURE_EXTRACTION.value
    sized_as = "AutoModel"
    batching = BatchSupport(predict=True)

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        if not ctx.config or ctx.resolved_task != "feature-extraction":
            return None
        return ctx.info(
            Family.FEATURE_EXTRACTION,
            "feature-extraction",
            sentence_transformers=ctx.sentence_transformers,
        )

    def load(self, info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
        return _load_parts(info, path, options.hf_kwargs())

    def predict(self, loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
        from modelhost.runtime.inference import _embed

        return _embed(loaded, model, inputs, params)

    def probe(self, loaded: LoadedModel) -> Probe:
        from modelhost.runtime.probes import feature_extraction_probe

        return feature_extraction_probe(loaded)


def _load_parts(info: FamilyInfo, path: Path, kw: dict[str, Any]) -> Parts:
    if info.sentence_transformers:
        from sentence_transformers import SentenceTransformer

        model_kwargs = {"dtype": kw["dtype"], "use_safetensors": kw["use_safetensors"]}
        model = SentenceTransformer(
            str(path), device="cpu", local_files_only=True, model_kwargs=model_kwargs
        )
        return Parts(model, None, extra={"backend": "sentence-transformers"})
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return Parts(model, tokenizer, extra={"backend": "transformers-mean-pooling"})
