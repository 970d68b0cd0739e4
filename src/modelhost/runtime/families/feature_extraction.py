"""Embeddings: a sentence-transformers layout, or any encoder mean-pooled."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.runtime.families.base import (
    Adapter,
    BatchPlan,
    BatchSupport,
    DetectContext,
    LoadOptions,
    Parts,
)
from modelhost.runtime.families.vocabulary import Family, FamilyInfo
from modelhost.runtime.sentence_layout import SentenceLayout, read_layout

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
        return _load_parts(info, path, options)

    def predict(self, loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
        # runtime.compute imports torch: here, not at the module's top
        from modelhost.runtime.compute.embedding import embed

        return embed(loaded, model, inputs, params)

    def predict_batch(self, loaded: LoadedModel, inputs: Any, params: dict) -> BatchPlan:
        # runtime.compute imports torch: here, not at the module's top
        from modelhost.runtime.compute.embedding import embedding_batch

        return embedding_batch(loaded, inputs, params)

    def probe(self, loaded: LoadedModel) -> Probe:
        return _probe(loaded)


def _load_parts(info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
    """The encoder and tokenizer, pooled as the model's sentence-transformers layout says.

    modelhost runs the usual layout (Transformer, Pooling, Normalize) itself; only a pipeline
    with other modules needs the ``sentence-transformers`` package (a missing one is reported
    with the ``pip install`` that brings it)."""
    from transformers import AutoModel, AutoTokenizer

    from modelhost.runtime.pretrained import load_pretrained

    layout = read_layout(path) if info.sentence_transformers else SentenceLayout()
    if not layout.native:
        return _load_sentence_transformers(path, options)
    model = load_pretrained(AutoModel, path, options)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    backend = "sentence-layout" if info.sentence_transformers else "transformers-mean-pooling"
    return Parts(model, tokenizer, extra={"backend": backend, "layout": layout})


def _load_sentence_transformers(path: Path, options: LoadOptions) -> Parts:
    """A pipeline modelhost does not run itself, through the sentence-transformers package."""
    from sentence_transformers import SentenceTransformer

    kw = options.hf_kwargs()
    model_kwargs = {"dtype": kw["dtype"], "use_safetensors": kw["use_safetensors"]}
    model = SentenceTransformer(
        str(path), device="cpu", local_files_only=True, model_kwargs=model_kwargs
    )
    return Parts(model, None, extra={"backend": "sentence-transformers"})


def _probe(loaded: LoadedModel) -> Probe:
    """Unit-norm embeddings of the sample sentences (sentence-transformers or pooled)."""
    import torch

    from modelhost.runtime.probes import (
        EMBEDDING_TOLERANCE,
        SAMPLE_TEXTS,
        Probe,
        on_device,
        probe_parts,
        sentence_batch,
    )

    model, device, proc = probe_parts(loaded)
    if loaded.extra.get("backend") == "sentence-transformers":
        preprocess = getattr(model, "preprocess", None) or model.tokenize
        features = on_device(dict(preprocess(SAMPLE_TEXTS)), device)

        def run_st(m: nn.Module, v: nn.Module | None) -> torch.Tensor:
            out = m(dict(features))["sentence_embedding"].float()
            return torch.nn.functional.normalize(out, dim=-1).cpu()

        return Probe(
            run_st,
            f"unit-norm embeddings of {len(SAMPLE_TEXTS)} sentences",
            EMBEDDING_TOLERANCE,
        )
    enc = sentence_batch(proc, device)
    layout: SentenceLayout = loaded.extra.get("layout") or SentenceLayout()

    def run_pooled(m: nn.Module, v: nn.Module | None) -> torch.Tensor:
        from modelhost.runtime.compute.embedding import pool

        pooled = pool(m(**enc).last_hidden_state.float(), enc["attention_mask"], layout.pooling)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()

    return Probe(
        run_pooled,
        f"unit-norm {'+'.join(layout.pooling)}-pooled embeddings of {len(SAMPLE_TEXTS)} sentences",
        EMBEDDING_TOLERANCE,
    )
