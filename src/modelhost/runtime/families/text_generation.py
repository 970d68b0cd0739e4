"""Text generation with a causal language model."""

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
from modelhost.runtime.families.text2text import GENERATION_TASKS
from modelhost.runtime.families.vocabulary import Family, FamilyInfo, has_suffix

if TYPE_CHECKING:  # annotations only: no torch on import
    from torch import nn

    from modelhost.runtime.loaded import LoadedModel
    from modelhost.runtime.probes import Probe


class TextGenerationAdapter(Adapter):
    """A ``*ForCausalLM`` / ``*LMHeadModel`` checkpoint."""

    name = Family.TEXT_GENERATION.value
    sized_as = "AutoModelForCausalLM"

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        task = ctx.resolved_task
        if not ctx.config or task not in GENERATION_TASKS or ctx.encoder_decoder:
            return None
        if task == "text2text-generation":
            raise ctx.unsupported("text2text-generation needs an encoder-decoder model")
        if not has_suffix(ctx.architectures, "ForCausalLM", "LMHeadModel"):
            raise ctx.unsupported("the checkpoint has no causal language-model head")
        return ctx.info(Family.TEXT_GENERATION, "text-generation")

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelhost.runtime.pretrained import load_pretrained

    model = load_pretrained(AutoModelForCausalLM, path, options)
    return Parts(model, AutoTokenizer.from_pretrained(path, local_files_only=True))


def _probe(loaded: LoadedModel) -> Probe:
    """Next-token probabilities over a sentence."""
    from modelhost.runtime.probes import (
        PROBABILITY_TOLERANCE,
        SAMPLE_TEXTS,
        Probe,
        on_device,
        probabilities,
        probe_parts,
    )

    _, device, proc = probe_parts(loaded)
    enc = on_device(dict(proc(SAMPLE_TEXTS[0], return_tensors="pt")), device)
    return Probe(
        lambda m, v: probabilities(m(**enc).logits),
        "next-token probabilities over a sentence",
        PROBABILITY_TOLERANCE,
    )
