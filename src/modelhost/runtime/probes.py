"""Representative inputs per family, for ``optimize``'s latency and agreement checks.

A probe runs one deterministic forward pass of the family's model (and vocoder) and returns
what it compares, as float32 on the CPU: class probabilities, unit-norm embeddings,
next-token probabilities under teacher forcing, or audio. ``relative`` probes compare
differences against the reference's peak (audio has no fixed scale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from modelhost.runtime.errors import UnsupportedModel
from modelhost.runtime.families import Family
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
    """The probe of ``loaded``'s family, its inputs prepared once."""
    family = loaded.family
    model = loaded.model
    assert model is not None
    device = _device(model)
    proc = loaded.processor

    if family is Family.TEXT_CLASSIFICATION:
        enc = _on(dict(proc(SAMPLE_TEXTS, padding=True, truncation=True, return_tensors="pt")),
                  device)  # fmt: skip
        return Probe(
            lambda m, v: _probabilities(m(**enc).logits),
            f"class probabilities of {len(SAMPLE_TEXTS)} sentences",
            PROBABILITY_TOLERANCE,
        )
    if family is Family.FEATURE_EXTRACTION:
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
        enc = _on(dict(proc(SAMPLE_TEXTS, padding=True, truncation=True, return_tensors="pt")),
                  device)  # fmt: skip

        def run_pooled(m: nn.Module, v: nn.Module | None) -> torch.Tensor:
            from modelhost.runtime.inference import mean_pool

            pooled = mean_pool(m(**enc).last_hidden_state.float(), enc["attention_mask"])
            return torch.nn.functional.normalize(pooled, dim=-1).cpu()

        return Probe(
            run_pooled,
            f"unit-norm mean-pooled embeddings of {len(SAMPLE_TEXTS)} sentences",
            EMBEDDING_TOLERANCE,
        )
    if family is Family.TEXT_GENERATION:
        enc = _on(dict(proc(SAMPLE_TEXTS[0], return_tensors="pt")), device)
        return Probe(
            lambda m, v: _probabilities(m(**enc).logits),
            "next-token probabilities over a sentence",
            PROBABILITY_TOLERANCE,
        )
    if family is Family.TEXT2TEXT:
        enc = _on(dict(proc(SAMPLE_TEXTS[0], return_tensors="pt")), device)
        start = model.config.decoder_start_token_id
        decoder = torch.cat(
            [torch.tensor([[start]], device=device), enc["input_ids"][:, :8]], dim=1
        )
        return Probe(
            lambda m, v: _probabilities(m(**enc, decoder_input_ids=decoder).logits),
            "decoder next-token probabilities (teacher-forced)",
            PROBABILITY_TOLERANCE,
        )
    if family is Family.WHISPER:
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
    if family is Family.IMAGE_CLASSIFICATION:
        generator = torch.Generator().manual_seed(0)
        side = int(getattr(model.config, "image_size", 224) or 224)
        image = torch.randint(0, 256, (side, side, 3), generator=generator, dtype=torch.uint8)
        pixels = pixel_values(proc, image.numpy()).to(device)
        return Probe(
            lambda m, v: _probabilities(m(pixel_values=pixels.to(_float(m))).logits),
            "class probabilities of a noise image",
            PROBABILITY_TOLERANCE,
        )
    if family is Family.SPEECHT5:
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
    if family is Family.VITS:
        enc = _on(dict(proc(SAMPLE_TEXTS[1], return_tensors="pt")), device)

        def run_vits(m: nn.Module, v: nn.Module | None) -> torch.Tensor:
            torch.manual_seed(0)  # VITS draws noise; the same noise for both models
            return m(**enc).waveform.float().cpu()

        return Probe(run_vits, "waveform of a sentence (same noise seed)", AUDIO_TOLERANCE, True)
    if family is Family.BARK:
        ids = proc(SAMPLE_TEXTS[1])["input_ids"][:, :64].to(device)
        return Probe(
            lambda m, v: _probabilities(m.semantic(input_ids=ids).logits),
            "semantic model next-token probabilities",
            PROBABILITY_TOLERANCE,
        )
    raise UnsupportedModel(
        f"optimize has no representative input for {family.value} models yet, so it cannot "
        "measure a change; the model is served as loaded"
    )


def smoke_inputs(loaded: LoadedModel) -> tuple[str, dict]:
    """A small real request for the family: ``("synthesize"|"predict", kwargs)``."""
    family = loaded.family
    if family.is_tts:
        return "synthesize", {"text": "hello world", "max_new_tokens": 8}
    if family is Family.WHISPER:
        rate = int(loaded.extra["input_sample_rate"])
        samples = _tone(rate, 0.5).tolist()
        return "predict", {
            "inputs": {"samples": samples, "sampling_rate": rate},
            "parameters": {"max_new_tokens": 2},
        }
    if family is Family.IMAGE_CLASSIFICATION:
        return "predict", {"inputs": {"pixels": [[[0, 128, 255]] * 8] * 8}, "parameters": {}}
    if family in (Family.TEXT_GENERATION, Family.TEXT2TEXT):
        return "predict", {"inputs": "hello world", "parameters": {"max_new_tokens": 2}}
    return "predict", {"inputs": "hello world", "parameters": {}}
