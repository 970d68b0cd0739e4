"""Download sizes of catalog entries, measured from the upstreams' own file listings.

``measure_sizes`` plans each entry's ``download_request`` (metadata only: the Hub's tree
listing with each file's size, a direct file's ``Content-Length``), sums what an install
would transfer — vocoder included — and records when and from which host. The results are
kept in ``<home>/catalog-sizes.json``, so the catalog view reports them without asking the
upstreams again; measuring again replaces them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel, ValidationError

from modelhost.catalog.catalog import BYTES_PER_MB, Catalog
from modelhost.errors import ModelhostError

FILE_NAME = "catalog-sizes.json"


class _PlannedFile(Protocol):
    url: str
    size: int | None


class _Planned(Protocol):
    """What measuring needs of a source's Plan."""

    @property
    def files(self) -> Sequence[_PlannedFile]: ...


class SizeMeasurement(BaseModel):
    """One entry's measured download: the listed size of every file an install fetches."""

    size_bytes: int | None
    files: int
    listed_by: str | None  # host:port that answered the listing
    measured_at: str
    error: str | None = None

    def view(self) -> dict[str, Any]:
        body = self.model_dump(mode="json")
        body["size_mb"] = (
            None if self.size_bytes is None else round(self.size_bytes / BYTES_PER_MB, 3)
        )
        return body


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def measure_entry(
    request: dict[str, Any], plan: Callable[[dict[str, Any]], _Planned]
) -> SizeMeasurement:
    """Plan one download request and sum its listed file sizes; an upstream or request
    error is recorded as the reason it could not be measured."""
    try:
        planned = plan(request)
    except ModelhostError as exc:
        return SizeMeasurement(
            size_bytes=None, files=0, listed_by=None, measured_at=_now(), error=exc.message
        )
    sizes = [f.size for f in planned.files]
    unknown = sum(1 for size in sizes if size is None)
    return SizeMeasurement(
        size_bytes=None if unknown else sum(s for s in sizes if s is not None),
        files=len(sizes),
        listed_by=urlsplit(planned.files[0].url).netloc if planned.files else None,
        measured_at=_now(),
        error=f"{unknown} file(s) listed without a size" if unknown else None,
    )


def measure_sizes(
    catalog: Catalog, plan: Callable[[dict[str, Any]], _Planned]
) -> dict[str, SizeMeasurement]:
    """Measure every entry of ``catalog`` with ``plan`` (blocking: metadata requests)."""
    return {entry.name: measure_entry(entry.download_request(), plan) for entry in catalog.models}


def save_sizes(home: Path, sizes: dict[str, SizeMeasurement]) -> None:
    """Write the measurements atomically to ``<home>/catalog-sizes.json``."""
    path = Path(home) / FILE_NAME
    tmp = path.with_suffix(".tmp")
    body = {name: m.model_dump(mode="json") for name, m in sizes.items()}
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", "utf-8")
    os.replace(tmp, path)


def load_sizes(home: Path) -> dict[str, SizeMeasurement]:
    """The last measurements, or none when never measured (or the file is unreadable)."""
    path = Path(home) / FILE_NAME
    try:
        raw = json.loads(path.read_text("utf-8"))
        return {name: SizeMeasurement.model_validate(m) for name, m in raw.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, ValidationError, AttributeError):
        return {}  # a damaged file only loses old measurements; measuring again rewrites it
