"""Text generation with a causal language model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelhost.runtime.families.base import DetectContext
from modelhost.runtime.families.generation import GENERATION_TASKS, GenerationAdapter
from modelhost.runtime.families.vocabulary import Family, FamilyInfo, has_suffix

if TYPE_CHECKING:  # annotations only: no torch on import
    import torch
    from torch import nn

    from modelhost.runtime.probes import Probe


class TextGenerationAdapter(GenerationAdapter):
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

    def sentence_probe(
        self, model: nn.Module, device: torch.device, encoded: dict[str, Any]
    ) -> Probe:
        """Next-token probabilities over a sentence."""
        from modelhost.runtime.probes import PROBABILITY_TOLERANCE, Probe, probabilities

        return Probe(
            lambda m, v: probabilities(m(**encoded).logits),
            "next-token probabilities over a sentence",
            PROBABILITY_TOLERANCE,
        )
