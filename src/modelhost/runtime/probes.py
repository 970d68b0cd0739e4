"""Representative inputs per family, for ``optimize``'s latency and agreement checks (each
family adapter's ``probe`` returns one of these).

A probe runs one deterministic forward pass of the family's model (and vocoder) and returns
what it compares, as float32 on the CPU: class probabilities, unit-norm embeddings,
next-token probabilities under teacher forcing, or audio. ``relative`` probes compare
differences against the reference's peak (audio has no fixed scale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from modelhost.runtime.images import pixel_values
from modelhost.runtime.loaded import LoadedModel

SAMPLE_TEXTS = [
    "The new model is a good test of the server.",
    "hello world, this is a short sentence about speech synthesis.",
    "Sphinx of black quartz, judge my vow.",
    "a bad movie is still a movie",
]
PROBABILITY_TOLERANCE = 0.02
EMBEDDING_TOLERANCE = 0.02
AUDIO_TOLERANCE = 0.05

Runner = Callable[[nn.Module, "nn.Module | None"], torch.Tensor]


@dataclass(frozen=True)
class Probe:
    """One representative forward pass and how its outputs are compared."""

    run: Runner
    compared: str
    tolerance: float
    relative: bool = False


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _float(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _on(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1).cpu()


def _tone(rate: int, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    signal = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 1330 * t)
    return signal.astype(np.float32)


def probe_for(loaded: LoadedModel) -> Probe:
    """The probe of ``loaded``'s family (its adapter's ``probe``), its inputs prepared once."""
    from modelhost.runtime.families.registry import adapter_for

    return adapter_for(loaded.family).probe(loaded)


def _parts(loaded: LoadedModel) -> tuple[nn.Module, torch.device, Any]:
    model = loaded.model
    assert model is not None
    return model, _device(model), loaded.processor


def _sentence_batch(proc: Any, device: torch.device) -> dict:
    return _on(dict(proc(SAMPLE_TEXTS, padding=True, truncation=True, return_tensors="pt")),
               device)  # fmt: skip


def text_classification_probe(loaded: LoadedModel) -> Probe:
    """Class probabilities of the sample sentences."""
    _, device, proc = _parts(loaded)
    enc = _sentence_batch(proc, device)
    return Probe(
        lambda m, v: _probabilities(m(**enc).logits),
        f"class probabilities of {len(SAMPLE_TEXTS)} sentences",
        PROBABILITY_TOLERANCE,
    )


def feature_extraction_probe(loaded: LoadedModel) -> Probe:
    """Unit-norm embeddings of the sample sentences (sentence-transformers or pooled)."""
    model, device, proc = _parts(loaded)
    if loaded.extra.get("backend") == "sentence-transformers":
        preprocess = getattr(model, "preprocess", None) or model.tokenize
        features = _on(dict(preprocess(SAMPLE_TEXTS)), device)

        def run_st(m: nn.Module, v: nn.Module | None) -> torch.Tensor:
            out = m(dict(features))["sentence_embedding"].float()
            return torch.nn.functional.normalize(out, dim=-1).cpu()

        return Probe(
            run_st,
            f"unit-norm embeddings of {len(SAMPLE_TEXTS)} sentences",
            EMBEDDING_TOLERANCE,
        )
    enc = _sentence_batch(proc, device)

    def run_pooled(m: nn.Module, v: nn.Module | None) -> torch.Tensor:
        from modelhost.runtime.inference import mean_pool

        pooled = mean_pool(m(**enc).last_hidden_state.float(), enc["attention_mask"])
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()

    return Probe(
        run_pooled,
        f"unit-norm mean-pooled embeddings of {len(SAMPLE_TEXTS)} sentences",
        EMBEDDING_TOLERANCE,
    )


def text_generation_probe(loaded: LoadedModel) -> Probe:
    """Next-token probabilities over a sentence."""
    _, device, proc = _parts(loaded)
    enc = _on(dict(proc(SAMPLE_TEXTS[0], return_tensors="pt")), device)
    return Probe(
        lambda m, v: _probabilities(m(**enc).logits),
        "next-token probabilities over a sentence",
        PROBABILITY_TOLERANCE,
    )


def text2text_probe(loaded: LoadedModel) -> Probe:
    """Decoder next-token probabilities, teacher-forced."""
    model, device, proc = _parts(loaded)
    enc = _on(dict(proc(SAMPLE_TEXTS[0], return_tensors="pt")), device)
    start = model.config.decoder_start_token_id
    decoder = torch.cat([torch.tensor([[start]], device=device), enc["input_ids"][:, :8]], dim=1)
    return Probe(
        lambda m, v: _probabilities(m(**enc, decoder_input_ids=decoder).logits),
        "decoder next-token probabilities (teacher-forced)",
        PROBABILITY_TOLERANCE,
    )


def whisper_probe(loaded: LoadedModel) -> Probe:
    """First-token probabilities for two seconds of tones."""
    model, device, proc = _parts(loaded)
    rate = int(loaded.extra["input_sample_rate"])
    features = proc.feature_extractor(_tone(rate), sampling_rate=rate, return_tensors="pt")
    feats = features.input_features.to(device)
    start = model.config.decoder_start_token_id
    decoder = torch.tensor([[start]], device=device)
    return Probe(
        lambda m, v: _probabilities(
            m(input_features=feats.to(_float(m)), decoder_input_ids=decoder).logits
        ),
        "first-token probabilities for 2 s of tones",
        PROBABILITY_TOLERANCE,
    )


def image_classification_probe(loaded: LoadedModel) -> Probe:
    """Class probabilities of a fixed noise image."""
    model, device, proc = _parts(loaded)
    generator = torch.Generator().manual_seed(0)
    side = int(getattr(model.config, "image_size", 224) or 224)
    image = torch.randint(0, 256, (side, side, 3), generator=generator, dtype=torch.uint8)
    pixels = pixel_values(proc, image.numpy()).to(device)
    return Probe(
        lambda m, v: _probabilities(m(pixel_values=pixels.to(_float(m))).logits),
        "class probabilities of a noise image",
        PROBABILITY_TOLERANCE,
    )


def speecht5_probe(loaded: LoadedModel) -> Probe:
    """The vocoder's waveform of a teacher-forced 16-frame spectrogram."""
    model, device, proc = _parts(loaded)
    ids = proc(text=SAMPLE_TEXTS[1], return_tensors="pt")["input_ids"].to(device)
    speaker = torch.from_numpy(np.asarray(loaded.extra["default_speaker"]))[None]
    frames = torch.zeros(1, 16, int(model.config.num_mel_bins))

    def run_speecht5(m: nn.Module, v: nn.Module | None) -> torch.Tensor:
        dtype = _float(m)
        out = m(
            input_ids=ids,
            speaker_embeddings=speaker.to(device, dtype),
            decoder_input_values=frames.to(device, dtype),
        ).spectrogram
        assert v is not None
        return v(out[0].to(_float(v))).float().cpu()

    return Probe(
        run_speecht5,
        "waveform of a teacher-forced 16-frame spectrogram through the vocoder",
        AUDIO_TOLERANCE,
        relative=True,
    )


def vits_probe(loaded: LoadedModel) -> Probe:
    """The waveform of a sentence, the same noise seed for both models."""
    _, device, proc = _parts(loaded)
    enc = _on(dict(proc(SAMPLE_TEXTS[1], return_tensors="pt")), device)

    def run_vits(m: nn.Module, v: nn.Module | None) -> torch.Tensor:
        torch.manual_seed(0)  # VITS draws noise; the same noise for both models
        return m(**enc).waveform.float().cpu()

    return Probe(run_vits, "waveform of a sentence (same noise seed)", AUDIO_TOLERANCE, True)


def bark_probe(loaded: LoadedModel) -> Probe:
    """The semantic model's next-token probabilities."""
    _, device, proc = _parts(loaded)
    ids = proc(SAMPLE_TEXTS[1])["input_ids"][:, :64].to(device)
    return Probe(
        lambda m, v: _probabilities(m.semantic(input_ids=ids).logits),
        "semantic model next-token probabilities",
        PROBABILITY_TOLERANCE,
    )


def smoke_inputs(loaded: LoadedModel) -> tuple[str, dict]:
    """A small real request for the family (its adapter's ``smoke``):
    ``("synthesize"|"predict", kwargs)``."""
    from modelhost.runtime.families.registry import adapter_for

    request = adapter_for(loaded.family).smoke(loaded)
    return request.kind, request.kwargs
