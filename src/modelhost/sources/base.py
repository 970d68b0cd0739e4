"""The nouns every source shares: the download request and the plan it turns into."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from modelhost.fetch import FetchEngine, FileSpec
from modelhost.names import NAME_PATTERN


class DownloadRequest(BaseModel):
    """The body of ``POST /models/download`` (the seed's fields plus modelhost's options)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    source: str
    model_id: str = Field(min_length=1, max_length=2048)
    name: str
    task: str = "text-generation"
    auto_convert_tts: bool = False
    speak_with: str | None = Field(
        default=None,
        pattern=NAME_PATTERN.pattern,
        description="with auto_convert_tts on a text model: an installed text-to-speech model "
        "that speaks the text this model generates (a pipeline: the text model makes no audio)",
    )
    include_vocoder: bool = False
    vocoder_model: str | None = None
    enable_large_model: bool = False
    experimental: bool = False
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="url source: expected sha256 of the file; the download fails if it differs",
    )
    filename: str | None = Field(
        default=None, description="url source: file name inside the model directory"
    )
    allow_pickle: bool = Field(
        default=False,
        description="allow pickled weights (.pth, .pt, .bin, .ckpt, .pkl); loaded weights_only",
    )
    load: bool = Field(
        default=True, description="load the model once installed (the seed's 'download and load')"
    )
    device: str | None = Field(default=None, description="device to load on (default: setting)")
    pin: bool = Field(default=False, description="keep the model loaded (never evicted)")
    load_as: str | None = Field(
        default=None,
        pattern=r"^(torchscript|torchvision:[a-z][a-z0-9_]{0,63})$",
        description="url source: how to load the file: 'torchscript' (a TorchScript archive) "
        "or 'torchvision:<architecture>' (a state dict for that torchvision model)",
    )
    revision: str | None = Field(
        default=None,
        max_length=256,
        description="huggingface source: branch, tag or commit (default main); installs pin "
        "the commit it resolves to",
    )
    allow_patterns: list[str] | None = Field(
        default=None, description="huggingface source: only files matching these globs"
    )
    ignore_patterns: list[str] | None = Field(
        default=None, description="huggingface source: skip files matching these globs"
    )


@dataclass(frozen=True)
class Plan:
    """What a source decided to fetch, before any byte of it moves."""

    source: str
    model_id: str
    task: str | None
    files: list[FileSpec]
    revision: str | None = None
    model_type: str | None = None
    description: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_size(self) -> int | None:
        """Sum of the files' sizes, or None when any size is unknown."""
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)


@dataclass(frozen=True)
class SourceContext:
    """What a source may use while planning: metadata requests through the engine's policy,
    and the Hub's settings."""

    engine: FetchEngine
    hub: Any = None  # sources.huggingface.HubSettings
    mirrors: dict[str, str | None] = field(default_factory=dict)  # source -> base URL
    torch_hub_allow: tuple[str, ...] = ()  # owner/repo whose hubconf.py may run
    import_roots: tuple[Path, ...] = ()  # directories the local source may import from


class Source(Protocol):
    """Turns a request into a Plan. Blocking; reads metadata only, never writes bytes."""

    name: str

    def plan(self, request: DownloadRequest, context: SourceContext) -> Plan: ...
