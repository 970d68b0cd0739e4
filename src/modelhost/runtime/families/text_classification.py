"""Text classification: a ``*ForSequenceClassification`` checkpoint and its labels."""

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
from modelhost.runtime.families.vocabulary import Family, FamilyInfo, has_suffix

if TYPE_CHECKING:  # annotations only: no torch on import
    from torch import nn

    from modelhost.runtime.loaded import LoadedModel
    from modelhost.runtime.probes import Probe


class TextClassificationAdapter(Adapter):
    """Labels and scores for each input text."""

    name = Family.TEXT_CLASSIFICATION.value
    sized_as = "AutoModelForSequenceClassification"
    batching = BatchSupport(predict=True)

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        if not ctx.config or ctx.resolved_task != "text-classification":
            return None
        if not has_suffix(ctx.architectures, "ForSequenceClassification"):
            raise ctx.unsupported(
                "the checkpoint has no sequence-classification head, so its labels "
                "would come from random weights"
            )
        return ctx.info(Family.TEXT_CLASSIFICATION, "text-classification")

    def load(self, info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
        return _load_parts(info, path, options)

    def predict(self, loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
        # runtime.compute imports torch: here, not at the module's top
        from modelhost.runtime.compute.text_classification import classify_text

        return classify_text(loaded, model, inputs, params)

    def predict_batch(self, loaded: LoadedModel, inputs: Any, params: dict) -> BatchPlan:
        # runtime.compute imports torch: here, not at the module's top
        from modelhost.runtime.compute.text_classification import classification_batch

        return classification_batch(loaded, inputs, params)

    def probe(self, loaded: LoadedModel) -> Probe:
        return _probe(loaded)


def _load_parts(info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from modelhost.runtime.pretrained import load_pretrained

    model = load_pretrained(AutoModelForSequenceClassification, path, options)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    labels = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    return Parts(model, tokenizer, extra={"labels": labels})


def _probe(loaded: LoadedModel) -> Probe:
    """Class probabilities of the sample sentences."""
    from modelhost.runtime.probes import (
        PROBABILITY_TOLERANCE,
        SAMPLE_TEXTS,
        Probe,
        probabilities,
        probe_parts,
        sentence_batch,
    )

    _, device, proc = probe_parts(loaded)
    enc = sentence_batch(proc, device)
    return Probe(
        lambda m, v: probabilities(m(**enc).logits),
        f"class probabilities of {len(SAMPLE_TEXTS)} sentences",
        PROBABILITY_TOLERANCE,
    )
