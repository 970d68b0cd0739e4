"""The families' shared vocabulary: the built-in ``Family`` names, ``FamilyInfo``, task
aliases, and the readers of the evidence a family is detected from (``config.json``, the
installed task, the vocoder component).

It imports no other module of this package (every adapter, ``base``, ``registry`` and
``detect`` import it), nor torch.
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
    """The built-in families (each value is its adapter's ``name``). A registered family
    needs no member: ``FamilyInfo.family`` is then its adapter's name."""

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

    family: Family | str  # a built-in ``Family``, or the name of a registered adapter
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


def has_suffix(architectures: tuple[str, ...], *suffixes: str) -> bool:
    return any(a.endswith(suffixes) for a in architectures)


def vocoder_path(manifest: Manifest, path: Path) -> Path | None:
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


def family_name(family: Family | str) -> str:
    """The adapter name of a family: a built-in ``Family``'s value, or the string itself."""
    return family.value if isinstance(family, Family) else str(family)


def task_from_architectures(
    architectures: tuple[str, ...], encoder_decoder: bool, st_layout: bool
) -> str | None:
    """A task for a model installed without one, read from its recorded head."""
    if st_layout:
        return "feature-extraction"
    if has_suffix(architectures, "ForSequenceClassification"):
        return "text-classification"
    if has_suffix(architectures, "ForImageClassification"):
        return "image-classification"
    if encoder_decoder and has_suffix(architectures, "ForConditionalGeneration"):
        return "text2text-generation"
    if has_suffix(architectures, "ForCausalLM", "LMHeadModel"):
        return "text-generation"
    if architectures and all(a.endswith("Model") for a in architectures):
        return "feature-extraction"
    return None
