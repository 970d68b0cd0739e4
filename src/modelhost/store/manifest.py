"""The manifest: what an installed model is, file by file."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, model_validator

from modelhost.spec import ModelSpec

# ``<name>.<32 hex digits>``: one path component, never "." or "..", so a manifest cannot
# make the store touch a directory outside ``versions/``.
VERSION_DIR_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.[0-9a-f]{32}$"


class ManifestFile(BaseModel):
    path: str
    size: int
    sha256: str
    git_sha1: str | None = None  # the Hub's id for files outside LFS


class Conversion(BaseModel):
    """A pickled weights file that was verified, then converted to safetensors; the pickle
    itself is not installed."""

    original_path: str
    original_size: int
    original_sha256: str
    converted_path: str
    converted_sha256: str
    tensors: int | None = None


class Manifest(BaseModel):
    """Written last when a model is installed; its presence is what makes the model exist."""

    name: str
    source: str
    model_id: str
    revision: str | None = None
    task: str | None = None
    files: list[ManifestFile] = Field(default_factory=list)
    downloaded_at: datetime | None = None
    last_used: datetime | None = None
    pinned: bool = False
    # Loaded with keep_alive -1 (never unloaded) when last seen: the server loads it again
    # at start, as it loads pinned models, on ``load_device``.
    keep_loaded: bool = False
    load_device: str | None = None  # the device of its last load ("cpu", "cuda:0", ...)
    download_id: str | None = None
    spec: ModelSpec = Field(default_factory=ModelSpec)
    conversions: list[Conversion] = Field(default_factory=list)
    # The directory under the store's ``versions/`` that holds this version's links (the
    # store's to set, at commit). None for a model committed before versioned directories:
    # its links are in ``models/<name>/`` itself.
    version_dir: str | None = Field(default=None, pattern=VERSION_DIR_PATTERN)

    @model_validator(mode="before")
    @classmethod
    def _migrate_extra(cls, data: Any) -> Any:
        """Manifests written before specs were typed kept what the source learned in an
        ``extra`` dict: read it into the spec (the file is rewritten in the new shape the
        next time the store saves it)."""
        if isinstance(data, dict) and "extra" in data:
            data = dict(data)
            extra = data.pop("extra") or {}
            if "spec" not in data:
                data["spec"] = ModelSpec.from_legacy(extra)
        return data

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)
