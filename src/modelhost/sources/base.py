"""The nouns every source shares: the download request and the plan it turns into."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from modelhost.config import PicklePolicy
from modelhost.convert import is_convertible
from modelhost.errors import InvalidRequest
from modelhost.fetch import CancelToken, FetchEngine, FileSpec
from modelhost.names import DEVICE_SCHEMA, NAME_PATTERN, NAME_SCHEMA, check_path_limits, shorten
from modelhost.spec import InstallOptions, ModelSpec

# The documented order, plus torchaudio (its Tacotron2 entry names that source) and local
# (a directory on this machine, under MODELHOST_IMPORT_ROOTS).
VALID_SOURCES = (
    "pytorch_hub",
    "torchvision",
    "huggingface",
    "url",
    "tts_auto",
    "torchaudio",
    "local",
)


# What each source's model_id looks like (each source checks its own with these rules; the
# patterns here restate them for the schema: tests/test_openapi_fuzz.py holds the two to one).
# url and local refuse with 403 (the allow-list, the import roots), which a schema need not
# foretell; schemathesis cannot generate from more if/then branches than these.
MODEL_ID_PATTERNS = {
    "huggingface": r"^(?!.*\.\.)([A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?"
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}$",
    "torchvision": r"^[a-z][a-z0-9_]{0,63}(:[A-Za-z0-9_]{1,64})?$",
    "torchaudio": r"^[A-Z][A-Z0-9_]{0,63}$",
    "pytorch_hub": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}/[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
    r":[A-Za-z0-9][A-Za-z0-9._-]{0,99}/[A-Za-z_][A-Za-z0-9_]{0,99}$",
}


def _model_id_rule(source: str, pattern: str) -> dict:
    """JSON Schema: when ``source`` is ``source``, ``model_id`` matches ``pattern``."""
    return {
        "if": {"properties": {"source": {"const": source}}, "required": ["source"]},
        "then": {"properties": {"model_id": {"pattern": pattern}}},
    }


# The rules between fields that the server checks (each source's model_id, and
# ``JobManager._check_speak_with``), shown in the schema so that what it calls valid is what the
# server takes.
_CROSS_FIELD_RULES = {
    "allOf": [
        *(_model_id_rule(source, pattern) for source, pattern in MODEL_ID_PATTERNS.items()),
        {  # speak_with goes with auto_convert_tts, on a huggingface text model
            "if": {"properties": {"speak_with": {"type": "string"}}, "required": ["speak_with"]},
            "then": {
                "properties": {
                    "auto_convert_tts": {"const": True},
                    "source": {"const": "huggingface"},
                },
                "required": ["auto_convert_tts", "source"],
            },
        }
    ]
}


class DownloadRequest(BaseModel):
    """The body of ``POST /models/download`` (the model-management fields plus install options)."""

    model_config = ConfigDict(
        extra="forbid", protected_namespaces=(), json_schema_extra=_CROSS_FIELD_RULES
    )

    # The choices are shown in the schema, not enforced here: get_source answers an unknown
    # source with the API's 400 message.
    source: str = Field(
        description="where the model comes from", json_schema_extra={"enum": list(VALID_SOURCES)}
    )
    model_id: str = Field(min_length=1, max_length=2048)
    name: str = Field(
        description="the model's name here: 1-128 letters, digits, '.', '_' or '-', starting "
        "with a letter or digit (checked by the server, which answers 400 otherwise)",
        json_schema_extra=NAME_SCHEMA,
    )
    task: str = "text-generation"
    auto_convert_tts: bool = False
    speak_with: str | None = Field(
        default=None,
        pattern=NAME_PATTERN.pattern,
        json_schema_extra=NAME_SCHEMA,
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
        default=True, description="load the model once installed (download and load in one request)"
    )
    device: str | None = Field(
        default=None,
        description="device to load on (default: setting)",
        json_schema_extra=DEVICE_SCHEMA,
    )
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
    # Not part of the identity (it changes how fast, not what, gets installed): a request
    # that differs only in max_mbps joins the job already running, which keeps its own cap.
    max_mbps: float | None = Field(
        default=None,
        gt=0,
        le=1_000_000,
        description="cap this download's bandwidth, in MB/s (10^6 bytes per second), on top "
        "of MODELHOST_FETCH_MAX_MBPS; all its files and connections share it",
    )


@dataclass(frozen=True)
class FileChanges:
    """What an update changes, file by file, compared by content."""

    from_revision: str | None
    to_revision: str | None
    added: list[str]
    modified: list[str]
    removed: list[str]
    unchanged: int


@dataclass(frozen=True)
class Plan:
    """What a source decided to fetch, before any byte of it moves.

    ``spec`` is what goes on into the manifest; ``convert``, ``archive`` and ``changes``
    are the job's own business and end with it."""

    source: str
    model_id: str
    task: str | None
    files: list[FileSpec]
    revision: str | None = None
    spec: ModelSpec = field(default_factory=ModelSpec)
    convert: list[str] = field(default_factory=list)  # pickles to convert to safetensors
    archive: Literal["zip"] | None = None  # the file is an archive, unpacked at commit
    changes: FileChanges | None = None  # an update: what it changes

    @property
    def model_type(self) -> str | None:
        return self.spec.model_type

    @property
    def description(self) -> str | None:
        return self.spec.description

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
    cancel: CancelToken | None = None  # aborts the planning's requests (shutdown)
    pickle_policy: PicklePolicy = "convert"  # MODELHOST_PICKLE_POLICY
    import_roots: tuple[Path, ...] = ()  # directories the local source may import from


def install_options(request: DownloadRequest) -> InstallOptions:
    """The request's identity: the fields that change what gets installed."""
    options = request.model_dump(include=set(InstallOptions.model_fields) - {"legacy"})
    if request.source == "huggingface" and options["revision"] == "main":
        options["revision"] = None  # the default, said out loud
    return InstallOptions(**options)


PICKLE_REFUSED = (
    "this server refuses pickled weights (MODELHOST_PICKLE_POLICY=refuse), with or without "
    "allow_pickle"
)


def decide_pickles(
    pickled: list[str],
    policy: PicklePolicy,
    allow_pickle: bool,
    opt_in_message: str,
    convertible: bool = True,
) -> list[str]:
    """What to do with the pickled files a plan would fetch; returns those to convert.

    ``refuse``: any pickle is a 400 naming the setting. ``convert``: convertible state dicts
    are converted; anything else still needs ``allow_pickle`` (``opt_in_message`` says so).
    ``allow``: every pickle needs ``allow_pickle``. ``convertible`` False: the files are
    not state dicts (TorchScript), so conversion does not apply to them."""
    if not pickled:
        return []
    if policy == "refuse":
        raise InvalidRequest(
            f"{', '.join(pickled[:3])}: {PICKLE_REFUSED}; use safetensors weights",
            error="Pickled weights refused",
        )
    if policy == "convert" and convertible:
        # Only what the converter takes (training_args.bin is a pickled object, not weights).
        to_convert = [p for p in pickled if is_convertible(p.lower())]
        if len(to_convert) == len(pickled) or allow_pickle:
            return to_convert
    if not allow_pickle:
        raise InvalidRequest(opt_in_message, error="Pickled weights need opt-in")
    return []


class Source(Protocol):
    """Turns a request into a Plan. Blocking; reads metadata only, never writes bytes."""

    name: str

    def plan(self, request: DownloadRequest, context: SourceContext) -> Plan: ...


def check_file_paths(paths: list[str]) -> None:
    """Refuse a plan whose files cannot all exist side by side in one model directory.

    Each path must fit the filesystem's name limits; no path may appear twice, nor be both a
    file and a directory (``config.json`` and ``config.json/inner.json``). Checked while
    planning, so such a listing fails before any byte moves or anything is installed.
    """
    seen: set[str] = set()
    for path in paths:
        check_path_limits(path)
        if path in seen:
            raise InvalidRequest(
                f"Conflicting paths in the file listing: {shorten(path)!r} appears twice; "
                "nothing was installed",
                error="Conflicting paths",
            )
        seen.add(path)
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in seen:
                raise InvalidRequest(
                    f"Conflicting paths in the file listing: {shorten(parent)!r} is a file "
                    f"and also the directory of {shorten(path)!r}; nothing was installed",
                    error="Conflicting paths",
                )
