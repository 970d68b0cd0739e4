"""Text-to-text generation with an encoder-decoder (summarisation, translation, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.runtime.families.base import (
    Adapter,
    DetectContext,
    LoadOptions,
    Parts,
    SmokeRequest,
)
from modelhost.runtime.families.vocabulary import Family, FamilyInfo, has_suffix

GENERATION_TASKS = ("text-generation", "text2text-generation")


if TYPE_CHECKING:  # annotations only: no torch on import
    from torch import nn

    from modelhost.runtime.loaded import LoadedModel
    from modelhost.runtime.probes import Probe


class Text2TextAdapter(Adapter):
    """An encoder-decoder ``*ForConditionalGeneration`` checkpoint."""

    name = Family.TEXT2TEXT.value
    sized_as = "AutoModelForSeq2SeqLM"

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        if not ctx.config or ctx.resolved_task not in GENERATION_TASKS:
            return None
        if not ctx.encoder_decoder:
            return None  # a causal LM: text_generation's
        if not has_suffix(ctx.architectures, "ForConditionalGeneration"):
            raise ctx.unsupported("the encoder-decoder checkpoint has no language-model head")
        return ctx.info(Family.TEXT2TEXT, "text2text-generation")

    def load(self, info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
        return _load_parts(info, path, options)

    def predict(self, loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
        from modelhost.runtime.inference import _generate

        return _generate(loaded, model, inputs, params)

    def probe(self, loaded: LoadedModel) -> Probe:
        return _probe(loaded)

    def smoke(self, loaded: LoadedModel) -> SmokeRequest:
        return SmokeRequest(
            "predict", {"inputs": "hello world", "parameters": {"max_new_tokens": 2}}
        )


def _load_parts(info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from modelhost.runtime.pretrained import load_pretrained

    model = load_pretrained(AutoModelForSeq2SeqLM, path, options)
    return Parts(model, AutoTokenizer.from_pretrained(path, local_files_only=True))


def _probe(loaded: LoadedModel) -> Probe:
    """Decoder next-token probabilities, teacher-forced."""
    import torch

    from modelhost.runtime.probes import (
        PROBABILITY_TOLERANCE,
        SAMPLE_TEXTS,
        Probe,
        on_device,
        probabilities,
        probe_parts,
    )

    model, device, proc = probe_parts(loaded)
    enc = on_device(dict(proc(SAMPLE_TEXTS[0], return_tensors="pt")), device)
    start = model.config.decoder_start_token_id
    decoder = torch.cat([torch.tensor([[start]], device=device), enc["input_ids"][:, :8]], dim=1)
    return Probe(
        lambda m, v: probabilities(m(**enc, decoder_input_ids=decoder).logits),
        "decoder next-token probabilities (teacher-forced)",
        PROBABILITY_TOLERANCE,
    )
