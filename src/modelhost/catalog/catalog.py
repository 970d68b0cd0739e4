"""The packaged catalog of downloadable models and the configured-models file (models.json).

Both ship as package data beside this module and are validated with pydantic when read.
The view functions shape the bodies of ``GET /models`` and ``GET /models/available``;
every list and count in them is computed from the data, never written by hand.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    computed_field,
    model_validator,
)

from modelhost.names import NAME_PATTERN
from modelhost.store.manifest import Manifest
from modelhost.units import MB

ModelName = Annotated[str, StringConstraints(pattern=NAME_PATTERN.pattern)]
Source = Literal["huggingface", "pytorch_hub", "torchvision", "torchaudio", "url", "tts_auto"]

TTS_TASKS = frozenset({"text-to-speech", "text-to-audio"})
STT_TASKS = frozenset({"automatic-speech-recognition"})
BYTES_PER_MB = MB  # size_mb is decimal megabytes, as everywhere in the API
# Seconds of CPU compute per second of output above which a model is not usable on a CPU.
CPU_REALTIME_LIMIT = 1.0
# The curated lists a newcomer follows: each may list only models that run usably on a CPU.
CPU_LISTS = ("popular_tts_models", "beginners", "fast_setup")

_PACKAGE = __package__ or "modelhost.catalog"
_STRICT = ConfigDict(extra="forbid", frozen=True)


def is_tts_task(task: str) -> bool:
    """Whether a task name means the model turns text into audio."""
    return task in TTS_TASKS


def speaks(manifest: Manifest) -> bool:
    """Whether an installed model is text-to-speech: its task says so, or its source
    recorded it as a TTS model (a VITS or SpeechT5 installed without a task)."""
    return manifest.spec.model_type == "tts" or bool(manifest.task and is_tts_task(manifest.task))


# --------------------------------------------------------------------------- models.json


class ModelConfigEntry(BaseModel):
    """One configured model in models.json."""

    model_config = _STRICT

    display_name: str = Field(min_length=1)
    task: str = Field(min_length=1)
    category: str = Field(min_length=1)
    enabled: bool = True
    type: Source
    model_name: str = Field(min_length=1)
    description: str = ""


class ModelsConfig(BaseModel):
    """The configured models behind ``GET /models``: ``{"models": {name: entry}}``."""

    model_config = _STRICT

    models: dict[ModelName, ModelConfigEntry]


# --------------------------------------------------------------------------- catalog


class TTSFeatures(BaseModel):
    """What a model itself can do for speech; optional fields are omitted when unknown."""

    model_config = _STRICT

    supports_tts: bool
    vocoder_required: bool
    supports_voice_cloning: bool
    supports_emotions: bool
    requires_adaptation: bool = False
    has_speech_head: bool | None = None
    speaker_embedding_required: bool | None = None
    speaker_presets: bool | None = None
    nonverbal_sounds: bool | None = None
    vocoder_bundled: bool | None = None
    languages: tuple[str, ...] | None = None

    def advertised(self) -> list[str]:
        """The capabilities claimed true (what the server must be able to deliver)."""
        return [name for name, value in self if value is True]


class CatalogEntry(BaseModel):
    """One downloadable model of the packaged catalog."""

    model_config = _STRICT

    name: ModelName
    source: Source
    model_id: str = Field(min_length=1)
    task: str = Field(min_length=1)
    description: str = Field(min_length=1)
    tags: tuple[str, ...]
    experimental: bool
    requires_custom_code: bool
    large_variant: ModelName | None
    vocoder_model: str | None
    weights: str | None = None
    pickled_weights: bool = False  # only pickles published: installing needs allow_pickle
    # Whether modelhost runs it at usable speed on a CPU; cpu_realtime_factor is the measured
    # seconds of CPU compute per second of output (TTS), cpu_note says how it was judged.
    cpu_usable: bool
    cpu_realtime_factor: float | None = Field(default=None, gt=0)
    cpu_note: str = Field(min_length=1)
    size_bytes: int | None = Field(ge=0)
    size_note: str | None = None
    tts_features: TTSFeatures

    @computed_field  # type: ignore[prop-decorator]
    @property
    def size_mb(self) -> float | None:
        """Decimal megabytes of the weights file(s), from ``size_bytes`` (``size_note`` says
        which files and how it was measured); None while unmeasured."""
        return None if self.size_bytes is None else round(self.size_bytes / BYTES_PER_MB, 1)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def size_measured(self) -> bool:
        """Whether ``size_bytes`` was measured (``size_note`` says from what, and when)."""
        return self.size_bytes is not None

    def download_request(self) -> dict[str, Any]:
        """The ``POST /models/download`` body that installs this entry as the catalog means it."""
        model_id = self.model_id
        if self.source == "torchvision" and self.weights:
            model_id = f"{self.model_id}:{self.weights}"
        body: dict[str, Any] = {
            "source": self.source,
            "model_id": model_id,
            "name": self.name,
            "task": self.task,
        }
        if self.vocoder_model:
            body.update(include_vocoder=True, vocoder_model=self.vocoder_model)
        if self.experimental:
            body["experimental"] = True
        if self.pickled_weights:
            body["allow_pickle"] = True
        return body

    @model_validator(mode="after")
    def _consistent(self) -> CatalogEntry:
        features = self.tts_features
        if features.supports_tts and not is_tts_task(self.task):
            raise ValueError(f"{self.name}: supports_tts for task {self.task!r}")
        if is_tts_task(self.task) and not features.supports_tts and not self.requires_custom_code:
            raise ValueError(f"{self.name}: a text-to-speech model the server runs must say so")
        # The runtime never runs a project's own code, so such an entry can deliver nothing.
        if self.requires_custom_code and features.advertised():
            raise ValueError(
                f"{self.name}: needs its own code, so it cannot advertise "
                f"{', '.join(features.advertised())}"
            )
        if self.vocoder_model is not None and not self.tts_features.vocoder_required:
            raise ValueError(f"{self.name}: vocoder_model set but vocoder_required is false")
        if self.large_variant == self.name:
            raise ValueError(f"{self.name}: large_variant names the entry itself")
        if self.cpu_usable and self.requires_custom_code:
            raise ValueError(f"{self.name}: download-only (its own code), so not cpu_usable")
        rtf = self.cpu_realtime_factor
        if self.cpu_usable and rtf is not None and rtf > CPU_REALTIME_LIMIT:
            raise ValueError(
                f"{self.name}: cpu_realtime_factor {rtf:g} (s of CPU per s of output) is "
                f"above {CPU_REALTIME_LIMIT:g}, so not cpu_usable"
            )
        return self


class Recommendations(BaseModel):
    """``download_recommendations`` of ``GET /models/available``."""

    model_config = _STRICT

    beginners: tuple[str, ...]
    advanced: tuple[str, ...]
    fast_setup: tuple[str, ...]
    highest_quality: tuple[str, ...]


class Catalog(BaseModel):
    """The packaged catalog: entries, curated lists, and the criteria behind each list."""

    model_config = _STRICT

    models: tuple[CatalogEntry, ...]
    popular_tts_models: tuple[str, ...]
    download_recommendations: Recommendations
    criteria: dict[str, str]

    @model_validator(mode="after")
    def _references_exist(self) -> Catalog:
        names = [entry.name for entry in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate catalog names: {duplicates}")
        known = set(names)
        referenced = {
            "popular_tts_models": self.popular_tts_models,
            **{key: tuple(value) for key, value in self.download_recommendations},
            **{
                f"{e.name}.large_variant": (e.large_variant,)
                for e in self.models
                if e.large_variant
            },
        }
        for where, refs in referenced.items():
            unknown = [r for r in refs if r not in known]
            if unknown:
                raise ValueError(f"{where} names entries not in the catalog: {unknown}")
        not_tts = [n for n in self.popular_tts_models if not is_tts_task(self._entry(n).task)]
        if not_tts:
            raise ValueError(f"popular_tts_models lists models without TTS support: {not_tts}")
        slow = {
            where: [n for n in refs if not self._entry(n).cpu_usable]
            for where, refs in referenced.items()
            if where in CPU_LISTS
        }
        for where, names in slow.items():
            if names:
                raise ValueError(
                    f"{where} lists models modelhost cannot run at usable speed on a CPU "
                    f"(download-only or cpu_usable false): {names}"
                )
        lists = {"popular_tts_models", *Recommendations.model_fields}
        if set(self.criteria) != lists:
            raise ValueError(f"criteria must explain exactly these lists: {sorted(lists)}")
        return self

    def _entry(self, name: str) -> CatalogEntry:
        return next(e for e in self.models if e.name == name)


# --------------------------------------------------------------------------- loading


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def _parse(text: str, label: str, model: type[BaseModel]) -> Any:
    """Parse JSON text into ``model``; every failure is a ValueError naming ``label``."""
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{label}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except ValueError as exc:
        raise ValueError(f"{label}: invalid JSON: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ValueError(f"{label}: invalid {model.__name__}: {problems}") from exc


def load_models_config(path: Path | None = None) -> ModelsConfig:
    """Read and validate a models.json; ``None`` reads the packaged default.

    Raises ValueError naming the file and the problem when it cannot be read, is not
    JSON, repeats a key, or does not match the schema: the server refuses to start with it.
    """
    if path is None:
        resource = resources.files(_PACKAGE).joinpath("models.json")
        return _parse(resource.read_text(encoding="utf-8"), f"packaged {resource}", ModelsConfig)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read models config: {exc}") from exc
    return _parse(text, str(path), ModelsConfig)


@cache
def load_catalog() -> Catalog:
    """The packaged available.json, validated (read once; the result is immutable)."""
    resource = resources.files(_PACKAGE).joinpath("available.json")
    return _parse(resource.read_text(encoding="utf-8"), f"packaged {resource}", Catalog)


def catalog_entry(catalog: Catalog, name: str) -> CatalogEntry | None:
    """The catalog entry called ``name``, or None when the catalog has no such entry."""
    return next((entry for entry in catalog.models if entry.name == name), None)


def entry_for_model_id(catalog: Catalog, model_id: str) -> CatalogEntry | None:
    """The catalog entry of an upstream model id (``microsoft/speecht5_tts``), or None."""
    return next((entry for entry in catalog.models if entry.model_id == model_id), None)


# --------------------------------------------------------------------------- views


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _specialized_key(task: str) -> str:
    if task in TTS_TASKS:
        return "tts_models"
    if task in STT_TASKS:
        return "stt_models"
    return task.replace("-", "_")


def models_view(config: ModelsConfig, loaded: set[str]) -> dict:
    """The body of ``GET /models`` for ``config``; ``loaded`` names the models in memory.

    ``specialized_models`` groups names by task (TTS, STT, then one key per other task,
    hyphens as underscores); the four documented keys are always present, possibly empty.
    ``tts_enabled`` is true for an enabled entry whose task is text-to-speech/-audio.
    """
    specialized: dict[str, list[str]] = {
        "tts_models": [],
        "stt_models": [],
        "image_classification": [],
        "text_classification": [],
    }
    for name, entry in config.models.items():
        specialized.setdefault(_specialized_key(entry.task), []).append(name)
    tts_names = [name for name, entry in config.models.items() if is_tts_task(entry.task)]
    return {
        "success": True,
        "timestamp": _utc_now(),
        "total_models": len(config.models),
        "available_models": list(config.models),
        "models_info": {
            name: {
                "display_name": entry.display_name,
                "task": entry.task,
                "category": entry.category,
                "enabled": entry.enabled,
                "tts_enabled": entry.enabled and is_tts_task(entry.task),
            }
            for name, entry in config.models.items()
        },
        "specialized_models": specialized,
        "audio_models": {
            "tts_detailed": {
                name: {
                    "type": config.models[name].type,
                    "model_name": config.models[name].model_name,
                    "description": config.models[name].description,
                }
                for name in tts_names
            },
            "loaded_audio_models": sorted(set(tts_names) & set(loaded)),
        },
    }


def _category(entry: CatalogEntry) -> str:
    if is_tts_task(entry.task):
        return "tts_models"
    if entry.task in STT_TASKS:
        return "stt_models"
    return "general_models"


def _installed_as(entry: CatalogEntry, manifests: list[Manifest]) -> list[Manifest]:
    """The installed models that are this entry: by catalog name (tts_auto records it) or
    by source and model id (a torchvision id may carry ``:WEIGHTS``)."""
    found = []
    for manifest in manifests:
        same_id = manifest.model_id in (entry.model_id, entry.download_request()["model_id"])
        if manifest.spec.catalog_name == entry.name or (
            manifest.source == entry.source and same_id
        ):
            found.append(manifest)
    return found


def available_view(
    catalog: Catalog, installed: list[Manifest], sizes: Mapping[str, Any] | None = None
) -> dict:
    """The body of ``GET /models/available``; ``installed`` are the models in the cache,
    ``sizes`` the last measurements of ``catalog.sizes`` (``download_size``, null until
    measured).

    Each entry carries its catalog fields (``size_mb`` null while unmeasured, with
    ``size_measured`` and ``size_note``), its ``tts_features`` without unknown fields, the
    ``download_request`` that installs it, and ``installed`` / ``installed_as`` (the names it
    is installed under) with ``installed_size_mb``, measured from that install's files.
    ``recommendation_criteria`` states what each curated list is based on.
    """
    available: dict[str, dict[str, Any]] = {}
    categories: dict[str, list[str]] = {"tts_models": [], "stt_models": [], "general_models": []}
    for entry in catalog.models:
        body = entry.model_dump(mode="json")
        body["tts_features"] = entry.tts_features.model_dump(mode="json", exclude_none=True)
        body["download_request"] = entry.download_request()
        installs = _installed_as(entry, installed)
        body["installed"] = bool(installs)
        body["installed_as"] = [m.name for m in installs]
        body["installed_size_mb"] = (
            round(installs[0].total_size / BYTES_PER_MB, 3) if installs else None
        )
        measured = (sizes or {}).get(entry.name)
        body["download_size"] = measured.view() if measured is not None else None
        available[entry.name] = body
        categories[_category(entry)].append(entry.name)
    return {
        "available_models": available,
        "total_available": len(available),
        "categories": categories,
        "popular_tts_models": list(catalog.popular_tts_models),
        "download_recommendations": catalog.download_recommendations.model_dump(mode="json"),
        "recommendation_criteria": dict(catalog.criteria),
    }
