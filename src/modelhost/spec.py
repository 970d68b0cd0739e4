"""What a source learns about a model, typed: the ``ModelSpec`` a plan carries into the
manifest and the runtime reads back.

This module imports nothing of modelhost's (and never torch), so that sources, jobs, the
store and the runtime can all use it without import cycles.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(extra="forbid", protected_namespaces=())

# The request fields that change what gets installed, in the order a 409 names them.
IDENTITY_FIELDS = (
    "source",
    "model_id",
    "revision",
    "task",
    "filename",
    "include_vocoder",
    "vocoder_model",
    "enable_large_model",
    "experimental",
    "allow_patterns",
    "ignore_patterns",
    "load_as",
    "allow_pickle",
    "auto_convert_tts",
    "speak_with",
)


class Component(BaseModel):
    """A second repository installed inside the model's directory (a TTS vocoder)."""

    model_config = _STRICT

    role: str = Field(description="what the component is for: 'vocoder'")
    repo_id: str
    revision: str | None = Field(default=None, description="the commit installed")
    path: str = Field(description="its folder inside the model directory")


class InstallOptions(BaseModel):
    """The install request's identity: every field that changes what gets installed, as the
    request sent it. Asking for the same name with other options is a different model."""

    model_config = _STRICT

    source: str
    model_id: str
    revision: str | None = None
    task: str | None = None
    filename: str | None = None
    include_vocoder: bool = False
    vocoder_model: str | None = None
    enable_large_model: bool = False
    experimental: bool = False
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None
    load_as: str | None = None
    allow_pickle: bool = False
    auto_convert_tts: bool = False
    speak_with: str | None = None
    # Manifests written before modelhost kept every option know only source and model_id.
    legacy: bool = Field(
        default=False, description="recorded by an older version: only source and model_id"
    )

    def differences(self, other: InstallOptions) -> list[tuple[str, Any, Any]]:
        """``(field, this value, other's value)`` for each identity field that differs.

        A legacy record is compared on what it knows: source and model_id."""
        fields = ("source", "model_id") if self.legacy or other.legacy else IDENTITY_FIELDS
        return [
            (name, getattr(self, name), getattr(other, name))
            for name in fields
            if getattr(self, name) != getattr(other, name)
        ]


def describe_differences(name: str, diffs: list[tuple[str, Any, Any]]) -> str:
    """The 409's message: how ``name`` is installed and what this request asks instead."""
    installed = ", ".join(f"{field}={json.dumps(old)}" for field, old, _ in diffs)
    asked = ", ".join(f"{field}={json.dumps(new)}" for field, _, new in diffs)
    return (
        f"'{name}' is installed with {installed}; this request asks for {asked}: delete it "
        "first or use another name"
    )


class ModelSpec(BaseModel):
    """What a source decided about a model: how to load it, what it is, what it needs.

    The plan carries it; the manifest keeps it; the runtime loads from it. ``load_as``
    names the loader target (``torchscript``, ``torchvision:<architecture>``,
    ``torch_hub:<entrypoint>``, ``torchaudio:<bundle>``); without it, a Transformers
    directory's ``config.json`` decides."""

    model_config = _STRICT

    model_type: str | None = Field(
        default=None, description="'tts', 'vision', 'torch_hub' or the config's architecture"
    )
    description: str | None = None
    architecture: str | None = Field(default=None, description="config.json's model_type")
    load_as: str | None = Field(default=None, description="loader target, see above")
    weights: str | None = Field(default=None, description="torchvision: the weights member")
    categories_count: int | None = Field(default=None, description="torchvision: classes")
    vocoder: str | None = Field(default=None, description="torchaudio: the vocoder kind")
    repo: str | None = Field(default=None, description="pytorch_hub: owner/repo")
    directory: str | None = Field(default=None, description="local: the imported folder")
    requested_revision: str | None = Field(
        default=None, description="huggingface: the branch or tag asked for"
    )
    components: list[Component] = Field(default_factory=list)
    vocoder_models: list[str] = Field(default_factory=list)
    speak_with: str | None = Field(
        default=None, description="the installed TTS model that speaks this model's text"
    )
    supports_voice_cloning: bool | None = None
    speaker_embeddings: str | None = Field(
        default=None, description="where the voices come from (tts_auto)"
    )
    catalog_name: str | None = Field(default=None, description="tts_auto: the catalog entry")
    loadable: bool = Field(default=True, description="false: installed download-only")
    notes: list[str] = Field(default_factory=list)
    options: InstallOptions | None = Field(
        default=None, description="the install request's options (None: not recorded)"
    )

    @property
    def target(self) -> tuple[str, str] | None:
        """``load_as`` split into (loader, name): ('torch_hub', 'entrypoint'), or
        ('torchscript', '') ; None when the config decides."""
        if not self.load_as:
            return None
        loader, _, name = self.load_as.partition(":")
        return loader, name

    @property
    def allows_pickle(self) -> bool:
        """Whether the install opted in to pickled weights (``allow_pickle``)."""
        return self.options is not None and self.options.allow_pickle

    @classmethod
    def from_legacy(cls, extra: dict[str, Any]) -> ModelSpec:
        """The spec of a manifest (or job plan) written before specs were typed, when what a
        source learned travelled in an ``extra`` dict. Keys no longer used are dropped."""
        data = {key: value for key, value in extra.items() if key in cls.model_fields}
        data.pop("options", None)
        requested = extra.get("requested")
        if isinstance(requested, dict) and requested.get("source"):
            data["options"] = InstallOptions(
                source=str(requested["source"]),
                model_id=str(requested.get("model_id") or ""),
                legacy=True,
            )
        return cls.model_validate(data)
