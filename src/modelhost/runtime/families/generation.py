"""What the two text-generation families share: ``text2text`` (an encoder-decoder) and
``text_generation`` (a causal LM).

Both load a Transformers language model (the ``AutoModelFor...`` class their ``sized_as``
names) with its tokenizer, answer ``predict`` with ``runtime.compute.generation.generate``,
send the same smoke request and probe on the same tokenised sentence. Each family's module
keeps what differs: ``detect`` and the forward pass its probe measures (``sentence_probe``).
Like every adapter module, this one imports no torch or Transformers at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.runtime.families.base import Adapter, LoadOptions, Parts, SmokeRequest
from modelhost.runtime.families.vocabulary import FamilyInfo

if TYPE_CHECKING:  # annotations only: no torch on import
    import torch
    from torch import nn

    from modelhost.runtime.loaded import LoadedModel
    from modelhost.runtime.probes import Probe

# The tasks a generation family serves; which family takes a model is decided by whether
# it is an encoder-decoder (each family's ``detect``).
GENERATION_TASKS = ("text-generation", "text2text-generation")


class GenerationAdapter(Adapter):
    """A language model answered with ``generate``. Subclasses set ``name`` and
    ``sized_as`` (the class built and sized) and define ``detect`` and ``sentence_probe``."""

    def load(self, info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
        import transformers

        from modelhost.runtime.pretrained import load_pretrained

        model = load_pretrained(getattr(transformers, self.sized_as), path, options)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        return Parts(model, tokenizer)

    def predict(self, loaded: LoadedModel, model: nn.Module, inputs: Any, params: dict) -> dict:
        # runtime.compute imports torch: here, not at the module's top
        from modelhost.runtime.compute.generation import generate

        return generate(loaded, model, inputs, params)

    def smoke(self, loaded: LoadedModel) -> SmokeRequest:
        # Two new tokens show the candidate generates, at little cost on any device.
        return SmokeRequest(
            "predict", {"inputs": "hello world", "parameters": {"max_new_tokens": 2}}
        )

    def probe(self, loaded: LoadedModel) -> Probe:
        """The family's ``sentence_probe`` on the probes' sample sentence, tokenised onto
        the model's device."""
        from modelhost.runtime.probes import SAMPLE_TEXTS, on_device, probe_parts

        model, device, tokenizer = probe_parts(loaded)
        encoded = on_device(dict(tokenizer(SAMPLE_TEXTS[0], return_tensors="pt")), device)
        return self.sentence_probe(model, device, encoded)

    def sentence_probe(
        self, model: nn.Module, device: torch.device, encoded: dict[str, Any]
    ) -> Probe:
        """The forward pass ``optimize`` measures, given the tokenised sample sentence."""
        raise NotImplementedError
