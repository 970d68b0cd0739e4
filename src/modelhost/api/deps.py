"""FastAPI dependencies: the services of the running app, and the API key check."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, TypeVar

from fastapi import Depends, Path, Query, Request

from modelhost.catalog import Catalog, ModelsConfig
from modelhost.config import Settings
from modelhost.errors import InvalidRequest, Unauthorized
from modelhost.jobs import JobManager
from modelhost.names import NAME_PATTERN
from modelhost.runtime.registry import ModelRegistry
from modelhost.store import Store


@dataclass
class Services:
    """Everything the routers use, built once by the app's lifespan."""

    settings: Settings
    store: Store
    jobs: JobManager
    models_config: ModelsConfig
    catalog: Catalog
    runtime: ModelRegistry


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


# The name pattern, shown in the schema. Not enforced by FastAPI: validate_name answers a
# bad name with a 400 that says what a name may hold (and also refuses '..').
NAME_SCHEMA = {"pattern": NAME_PATTERN.pattern}
NAME_DOC = "a model name: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
ModelNamePath = Annotated[str, Path(description=NAME_DOC, json_schema_extra=NAME_SCHEMA)]
ModelNameQuery = Annotated[str, Query(description=NAME_DOC, json_schema_extra=NAME_SCHEMA)]

E = TypeVar("E", bound=Enum)


def parse_choice(kind: type[E], value: str, what: str) -> E:
    """``value`` as a member of ``kind``, or a 400 that lists the valid choices."""
    try:
        return kind(value)
    except ValueError:
        valid = ", ".join(str(member.value) for member in kind)
        raise InvalidRequest(
            f"Unknown {what} {value!r}; use one of: {valid}", error=f"Invalid {what}"
        ) from None
