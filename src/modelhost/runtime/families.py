"""Which loader a model gets: decided from the manifest's task and the model's config.json.

The name of a model is never consulted. ``config.json``'s ``model_type`` and
``architectures`` (what ``save_pretrained`` recorded) and the task the model was installed
for are the only evidence; when they do not point at a supported family the error says
what is supported.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelhost.runtime.errors import UnsupportedModel
from modelhost.store.manifest import Manifest


class Family(str, enum.Enum):
    """A loader and an inference path."""

    TEXT_CLASSIFICATION = "text-classification"
    FEATURE_EXTRACTION = "feature-extraction"
    TEXT_GENERATION = "text-generation"
    TEXT2TEXT = "text2text-generation"
    WHISPER = "whisper"
    IMAGE_CLASSIFICATION = "image-classification"
    SPEECHT5 = "speecht5"
    BARK = "bark"
    VITS = "vits"
    TORCHSCRIPT = "torchscript"  # a TorchScript archive from the url source: tensors in, out
    TORCHVISION = "torchvision"  # a torchvision architecture and a state dict for it
    TORCH_HUB = "torch_hub"  # an allow-listed PyTorch Hub repository's entrypoint
    TACOTRON2 = "tacotron2"  # a torchaudio Tacotron2 bundle (+ WaveRNN or Griffin-Lim)

    @property
    def is_tts(self) -> bool:
        return self in TTS_FAMILIES


TTS_FAMILIES = frozenset({Family.SPEECHT5, Family.BARK, Family.VITS, Family.TACOTRON2})

# Task names as installed (the Hub's pipeline tags and common aliases) -> canonical task.
TASK_ALIASES = {
    "text-to-speech": "text-to-speech",
    "text-to-audio": "text-to-speech",
    "tts": "text-to-speech",
    "text-classification": "text-classification",
    "sentiment-analysis": "text-classification",
    "feature-extraction": "feature-extraction",
    "sentence-similarity": "feature-extraction",
    "embeddings": "feature-extraction",
    "text-generation": "text-generation",
    "text2text-generation": "text2text-generation",
    "summarization": "text2text-generation",
    "translation": "text2text-generation",
    "automatic-speech-recognition": "automatic-speech-recognition",
    "speech-to-text": "automatic-speech-recognition",
    "asr": "automatic-speech-recognition",
    "image-classification": "image-classification",
}

SUPPORTED = (
    "text-to-speech with SpeechT5 (+ HiFiGAN vocoder component), Bark or VITS/MMS-TTS; "
    "text-classification (a *ForSequenceClassification checkpoint); feature-extraction "
    "(sentence-transformers layout or any encoder, mean-pooled); text-generation (a causal "
    "LM, or an encoder-decoder model); text2text-generation (encoder-decoder); "
    "automatic-speech-recognition with Whisper; image-classification "
    "(a *ForImageClassification checkpoint); from the url source, a TorchScript archive "
    "(load_as torchscript) or a state dict for a torchvision architecture "
    "(load_as torchvision:<name>); from the torchaudio source, a Tacotron2 text-to-speech "
    "bundle"
)


@dataclass(frozen=True)
class FamilyInfo:
    """What ``detect_family`` found: the family, the task it serves, and the evidence."""

    family: Family
    task: str
    model_type: str | None
    architectures: tuple[str, ...]
    config: dict[str, Any] = field(repr=False)
    sentence_transformers: bool = False  # feature-extraction: modules.json present
    vocoder_path: Path | None = None  # SpeechT5: the vocoder component's directory


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of the model directory, or ``{}`` when there is none. Raises
    ``UnsupportedModel`` naming config.json when it is not a JSON object or its
    ``model_type`` / ``architectures`` have the wrong types."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return {}
    try:
        data = json.loads(config_path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(
            f"config.json of {Path(path).name} is not valid JSON: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise UnsupportedModel(f"config.json of {Path(path).name} is not a JSON object")
    model_type = data.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise UnsupportedModel(f"config.json of {Path(path).name}: model_type must be a string")
    architectures = data.get("architectures")
    if architectures is not None and (
        not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)
    ):
        raise UnsupportedModel(
            f"config.json of {Path(path).name}: architectures must be a list of class names"
        )
    return data


def canonical_task(task: str | None) -> str | None:
    """The canonical name of an installed task; ``None`` when none was recorded."""
    if not task:
        return None
    key = task.strip().lower()
    if key not in TASK_ALIASES:
        raise UnsupportedModel(
            f"Task {task!r} has no loader. Supported: {SUPPORTED}",
        )
    return TASK_ALIASES[key]


def _has_suffix(architectures: tuple[str, ...], *suffixes: str) -> bool:
    return any(a.endswith(suffixes) for a in architectures)


def _vocoder_path(manifest: Manifest, path: Path) -> Path | None:
    """The vocoder component's directory, from the manifest's ``components``."""
    for component in manifest.spec.components:
        if component.role == "vocoder":
            rel = component.path or "vocoder"
            candidate = (Path(path) / rel).resolve()
            root = Path(path).resolve()
            if root not in candidate.parents:
                raise UnsupportedModel(f"vocoder component path {rel!r} leaves the model")
            return Path(path) / rel
    return None


def check_loadable(manifest: Manifest) -> None:
    """Raise ``UnsupportedModel`` for a model installed download-only (its plan said so)."""
    if not manifest.spec.loadable:
        why = "; ".join(manifest.spec.notes or ["modelhost has no loader for it"])
        raise UnsupportedModel(f"Model {manifest.name!r} is stored download-only: {why}")


def detect_family(manifest: Manifest, path: Path) -> FamilyInfo:
    """The loader family for an installed model, from its task and ``config.json``.

    Raises ``UnsupportedModel`` naming what was found and what is supported.
    """
    check_loadable(manifest)
    path = Path(path)
    load_as = manifest.spec.load_as or ""
    if load_as == "torchscript":
        return FamilyInfo(Family.TORCHSCRIPT, "tensor", None, (), {})
    if load_as.startswith("torch_hub:"):
        entrypoint = load_as.split(":", 1)[1]
        return FamilyInfo(Family.TORCH_HUB, "tensor", entrypoint, (), {})
    if load_as.startswith("torchaudio:"):
        bundle = load_as.split(":", 1)[1]
        return FamilyInfo(Family.TACOTRON2, "text-to-speech", bundle, (), {})
    if load_as.startswith("torchvision:"):
        architecture = load_as.split(":", 1)[1]
        weights = {"weights": manifest.spec.weights}  # the enum member installed
        return FamilyInfo(Family.TORCHVISION, "image-classification", architecture, (), weights)
    config = read_config(path)
    if not config:
        raise UnsupportedModel(
            f"Model {manifest.name!r} has no config.json: only Transformers-layout models "
            "(from_pretrained directories) and TorchScript files (url source with "
            f'load_as "torchscript") can be loaded. Supported: {SUPPORTED}'
        )
    model_type = config.get("model_type") or manifest.spec.architecture
    architectures = tuple(str(a) for a in config.get("architectures") or ())
    task = canonical_task(manifest.task)
    encoder_decoder = bool(config.get("is_encoder_decoder"))
    found = f"model_type {model_type!r}, architectures {list(architectures)}, task {task!r}"

    def info(family: Family, task_name: str, **kwargs: Any) -> FamilyInfo:
        return FamilyInfo(family, task_name, model_type, architectures, config, **kwargs)

    def unsupported(reason: str) -> UnsupportedModel:
        return UnsupportedModel(
            f"Cannot load {manifest.name!r} ({found}): {reason}. Supported: {SUPPORTED}"
        )

    # Text to speech: the architecture decides, the task must agree.
    if model_type in ("speecht5", "bark", "vits"):
        if task not in (None, "text-to-speech"):
            raise unsupported(f"a {model_type} model serves text-to-speech, not {task}")
        if model_type == "speecht5":
            if architectures and "SpeechT5ForTextToSpeech" not in architectures:
                raise unsupported("only SpeechT5ForTextToSpeech checkpoints make speech")
            vocoder = _vocoder_path(manifest, path)
            if vocoder is None or not (vocoder / "config.json").is_file():
                raise unsupported(
                    "SpeechT5 makes spectrograms and needs its HiFiGAN vocoder: install the "
                    "model with include_vocoder (the vocoder lives in <model>/vocoder/)"
                )
            return info(Family.SPEECHT5, "text-to-speech", vocoder_path=vocoder)
        return info(Family.BARK if model_type == "bark" else Family.VITS, "text-to-speech")
    if task == "text-to-speech":
        raise unsupported("text-to-speech needs a SpeechT5, Bark or VITS model")

    if model_type == "whisper":
        if task not in (None, "automatic-speech-recognition"):
            raise unsupported(f"a Whisper model serves speech recognition, not {task}")
        return info(Family.WHISPER, "automatic-speech-recognition")
    if task == "automatic-speech-recognition":
        raise unsupported("speech recognition is supported with Whisper models only")

    st_layout = (path / "modules.json").is_file()
    if task is None:
        task = _task_from_architectures(architectures, encoder_decoder, st_layout)
        if task is None:
            raise unsupported("no task was recorded and the architectures do not name one")

    if task == "text-classification":
        if not _has_suffix(architectures, "ForSequenceClassification"):
            raise unsupported(
                "the checkpoint has no sequence-classification head, so its labels "
                "would come from random weights"
            )
        return info(Family.TEXT_CLASSIFICATION, task)
    if task == "feature-extraction":
        return info(Family.FEATURE_EXTRACTION, task, sentence_transformers=st_layout)
    if task in ("text-generation", "text2text-generation"):
        if encoder_decoder:
            if not _has_suffix(architectures, "ForConditionalGeneration"):
                raise unsupported("the encoder-decoder checkpoint has no language-model head")
            return info(Family.TEXT2TEXT, "text2text-generation")
        if task == "text2text-generation":
            raise unsupported("text2text-generation needs an encoder-decoder model")
        if not _has_suffix(architectures, "ForCausalLM", "LMHeadModel"):
            raise unsupported("the checkpoint has no causal language-model head")
        return info(Family.TEXT_GENERATION, task)
    if task == "image-classification":
        if not _has_suffix(architectures, "ForImageClassification"):
            raise unsupported("the checkpoint has no image-classification head")
        return info(Family.IMAGE_CLASSIFICATION, task)
    raise unsupported(f"no loader for task {task}")  # pragma: no cover - aliases are covered


def _task_from_architectures(
    architectures: tuple[str, ...], encoder_decoder: bool, st_layout: bool
) -> str | None:
    """A task for a model installed without one, read from its recorded head."""
    if st_layout:
        return "feature-extraction"
    if _has_suffix(architectures, "ForSequenceClassification"):
        return "text-classification"
    if _has_suffix(architectures, "ForImageClassification"):
        return "image-classification"
    if encoder_decoder and _has_suffix(architectures, "ForConditionalGeneration"):
        return "text2text-generation"
    if _has_suffix(architectures, "ForCausalLM", "LMHeadModel"):
        return "text-generation"
    if architectures and all(a.endswith("Model") for a in architectures):
        return "feature-extraction"
    return None
