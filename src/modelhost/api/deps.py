"""FastAPI dependencies: the services of the running app, and the API key check."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from modelhost.catalog import Catalog, ModelsConfig
from modelhost.config import Settings
from modelhost.errors import Unauthorized
from modelhost.jobs import JobManager
from modelhost.store import Store


@dataclass
class Services:
    """Everything the routers use, built once by the app's lifespan."""

    settings: Settings
    store: Store
    jobs: JobManager
    models_config: ModelsConfig
    catalog: Catalog


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def require_api_key(request: Request) -> None:
    """When ``MODELHOST_API_KEY`` is set, require ``Authorization: Bearer <key>``."""
    expected = request.app.state.settings.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), expected):
        raise Unauthorized(
            "This server requires an API key: send 'Authorization: Bearer <MODELHOST_API_KEY>'",
            error="Missing or wrong API key",
        )
