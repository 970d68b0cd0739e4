"""The manifest: what an installed model is, file by file."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class ManifestFile(BaseModel):
    path: str
    size: int
    sha256: str
    git_sha1: str | None = None  # the Hub's id for files outside LFS


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
    download_id: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)
