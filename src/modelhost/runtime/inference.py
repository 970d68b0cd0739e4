"""Inference on a loaded model, dispatched to its family: ``synthesize`` for TTS, ``predict``
for every other task, ``predict_work`` / ``synthesize_work`` for the model's worker, and the
``speak_generated`` pipeline.

Each entry point looks the model's family adapter up (``registry.adapter_for``) and calls
it; what a family computes lives under it, in ``runtime/compute/`` (which imports neither
this module nor the registry, so no import loop runs through the adapters). Everything is
blocking (call it from a worker thread) and holds the model's lock while the model runs, so
concurrent requests to one model are serialised and safe (tokenizers and generation keep
per-call state). Bad inputs raise ``InvalidInput``, a ``ValueError``, saying what was
expected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelhost.runtime.batching import Work
from modelhost.runtime.compute.generation import DEFAULT_NEW_TOKENS
from modelhost.runtime.compute.inputs import check_text, int_param
from modelhost.runtime.compute.model import using
from modelhost.runtime.errors import InvalidInput
from modelhost.runtime.families.registry import adapter_for
from modelhost.runtime.families.vocabulary import Family
from modelhost.runtime.loaded import LoadedModel
from modelhost.runtime.wav import Audio

# --------------------------------------------------------------------------- synthesize


def synthesize(
    loaded: LoadedModel,
    text: str,
    speaker: Any = None,
    *,
    max_new_tokens: int | None = None,
    seed: int | None = None,
) -> Audio:
    """Speech for ``text`` at the model's own sample rate.

    ``speaker``: SpeechT5, a list of ``speaker_embedding_dim`` floats (default: the packaged
    embedding, see ``runtime.speaker``); Bark, a voice preset name the model ships; VITS, a
    speaker id for multi-speaker models; Tacotron2, none (one speaker). ``max_new_tokens``
    caps Bark's semantic tokens (its audio length). ``seed`` seeds torch's global generator
    for this request only: VITS draws its noise from a per-request ``torch.Generator``; the
    families that sample inside ``generate`` (Bark) run with the global generator forked,
    seeded and restored under a lock. The same seed gives the same audio, also when other
    requests run at the same time.
    """
    if not loaded.is_tts:
        raise InvalidInput(
            f"Model {loaded.name!r} is a {loaded.task} model, not text-to-speech: use predict"
        )
    text = check_text(text, "text", loaded.max_text_chars)
    if max_new_tokens is not None:
        int_param({"max_new_tokens": max_new_tokens}, "max_new_tokens", None, 1, 4096)
    return adapter_for(loaded.family).synthesize(loaded, text, speaker, max_new_tokens, seed)


def synthesize_work(
    loaded: LoadedModel,
    text: str,
    speaker: Any = None,
    *,
    max_new_tokens: int | None = None,
    seed: int | None = None,
) -> tuple[Work, Any]:
    """``synthesize`` as work for the model's worker: batched as the family's adapter says
    (``synthesize_batch``, when its ``batching.synthesize`` is on), otherwise alone."""

    def alone() -> Audio:
        return synthesize(loaded, text, speaker, max_new_tokens=max_new_tokens, seed=seed)

    adapter = adapter_for(loaded.family)
    plan = None
    if adapter.batching.synthesize:
        plan = adapter.synthesize_batch(loaded, text, speaker, seed)
    if plan is None:
        return Work(alone), None
    return Work(plan.run_one or alone, plan.group, plan.items, plan.payload), plan.run


def speak_generated(
    text_model: LoadedModel,
    tts_model: LoadedModel,
    text: str,
    speaker: Any = None,
    *,
    max_new_tokens: int | None = None,
    seed: int | None = None,
) -> tuple[str, Audio]:
    """A two-model pipeline: ``text_model`` generates text from ``text`` (greedy,
    ``max_new_tokens``), then ``tts_model`` speaks what it generated. Returns both."""
    if text_model.family not in (Family.TEXT2TEXT, Family.TEXT_GENERATION):
        raise InvalidInput(
            f"Model {text_model.name!r} is a {text_model.task} model: a speak_with pipeline "
            "needs a text generation model"
        )
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens or DEFAULT_NEW_TOKENS}
    if text_model.family is Family.TEXT_GENERATION:
        params["return_full_text"] = False
    generated = str(predict(text_model, text, params)["generated_text"]).strip()
    if not generated:
        raise InvalidInput(f"Model {text_model.name!r} generated no text to speak")
    return generated, synthesize(tts_model, generated, speaker, seed=seed)


# --------------------------------------------------------------------------- predict


def predict(
    loaded: LoadedModel, inputs: Any, parameters: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Task-shaped results for ``inputs`` (the shape of Hugging Face's inference API).

    - text-classification: ``inputs`` a string or list; ``{"predictions": [{label, score}]}``
      sorted by score (a list of such lists for a list); ``top_k`` parameter.
    - feature-extraction: a string or list; ``{"embeddings": [[...]], "dimension": n}``;
      ``normalize`` parameter (unit L2 norm).
    - text-generation / text2text-generation: a string; ``{"generated_text": ...}``;
      ``max_new_tokens`` (default 32), ``do_sample``, ``temperature``, ``top_p``, ``top_k``,
      ``return_full_text`` (causal LMs, default true).
    - automatic-speech-recognition: base64 WAV, ``{"audio": base64}`` or
      ``{"samples": [floats], "sampling_rate": n}``; ``{"text": ...}``.
    - tensor (TorchScript): a nested list of numbers (or ``{"tensor": ...}``), one float32
      input; ``{"outputs": nested list, "shape": [...]}`` (a list of those for tuple outputs).
    - image-classification: base64 image, ``{"image": base64}`` or ``{"pixels": HxWx3}``;
      ``{"predictions": [{label, score, class_id}]}``, ``top_k`` (default 5).
    """
    params = dict(parameters or {})
    handler = adapter_for(loaded.family).predict
    if handler is None:
        raise InvalidInput(f"Model {loaded.name!r} is text-to-speech: use synthesize")
    with using(loaded) as model:
        return handler(loaded, model, inputs, params)


def predict_work(
    loaded: LoadedModel, inputs: Any, parameters: Mapping[str, Any] | None = None
) -> tuple[Work, Any]:
    """``predict`` as work for the model's worker, and the batch function of its group.

    The family's adapter says how a request batches (``predict_batch``, asked only when its
    ``batching.predict`` is on); otherwise the request runs alone."""
    params = dict(parameters or {})

    def alone() -> dict[str, Any]:
        return predict(loaded, inputs, params)

    adapter = adapter_for(loaded.family)
    plan = adapter.predict_batch(loaded, inputs, params) if adapter.batching.predict else None
    if plan is None:
        return Work(alone), None
    return Work(plan.run_one or alone, plan.group, plan.items, plan.payload), plan.run
