"""Text-to-text generation with an encoder-decoder (summarisation, translation, ...)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelhost.runtime.families.base import DetectContext
from modelhost.runtime.families.generation import GENERATION_TASKS, GenerationAdapter
from modelhost.runtime.families.vocabulary import Family, FamilyInfo, has_suffix

if TYPE_CHECKING:  # annotations only: no torch on import
    import torch
    from torch import nn

    from modelhost.runtime.probes import Probe


class Text2TextAdapter(GenerationAdapter):
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

    def sentence_probe(
        self, model: nn.Module, device: torch.device, encoded: dict[str, Any]
    ) -> Probe:
        """Decoder next-token probabilities, teacher-forced."""
        import torch

        from modelhost.runtime.probes import PROBABILITY_TOLERANCE, Probe, probabilities

        start = torch.tensor([[model.config.decoder_start_token_id]], device=device)
        decoder = torch.cat([start, encoded["input_ids"][:, :8]], dim=1)
        return Probe(
            lambda m, v: probabilities(m(**encoded, decoder_input_ids=decoder).logits),
            "decoder next-token probabilities (teacher-forced)",
            PROBABILITY_TOLERANCE,
        )
