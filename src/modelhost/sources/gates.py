"""The catalog's gates, the same whichever source a request names.

A catalog entry marked ``experimental`` installs only for a request that says
``"experimental": true``: naming it through ``tts_auto`` or through its own source
(``huggingface`` and the id) is refused the same way, with the reason. The pickle opt-in is
the concrete source's own gate (``decide_pickles``); nothing here grants it.
"""

from __future__ import annotations

from modelhost.catalog import CatalogEntry, load_catalog
from modelhost.errors import InvalidRequest
from modelhost.sources.base import DownloadRequest


class ExperimentalNotAccepted(InvalidRequest):
    """An experimental catalog model asked for without ``"experimental": true``."""

    error = "Experimental model"


def entry_for_request(source: str, model_id: str) -> CatalogEntry | None:
    """The catalog entry a concrete ``source`` + ``model_id`` installs, or None."""
    return next(
        (e for e in load_catalog().models if e.source == source and e.model_id == model_id),
        None,
    )


def require_opt_ins(request: DownloadRequest, entry: CatalogEntry | None) -> None:
    """Refuse ``request`` for ``entry`` unless it opted into what the entry needs."""
    if entry is not None and entry.experimental and not request.experimental:
        raise ExperimentalNotAccepted(
            f"{entry.model_id} (catalog entry {entry.name}) is experimental: "
            f'{entry.description} Set "experimental": true to install it anyway.',
        )


def check_catalog_gates(request: DownloadRequest) -> None:
    """The gates for a request naming a concrete source (``tts_auto`` checks its own entry)."""
    require_opt_ins(request, entry_for_request(request.source, request.model_id))
