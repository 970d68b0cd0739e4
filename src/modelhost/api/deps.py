"""FastAPI dependencies: the services of the running app, and the API key check."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, TypeVar

from fastapi import Depends, Path, Query, Request

from modelhost.catalog import Catalog, ModelsConfig
from modelhost.config import Settings
from modelhost.errors import InvalidRequest, Unauthorized
from modelhost.jobs import JobManager
from modelhost.mirror.index import MirrorIndex
from modelhost.mirror.stats import MirrorStats
from modelhost.names import NAME_SCHEMA
from modelhost.runtime.lifecycle import ModelLifecycle
from modelhost.runtime.registry import ModelRegistry
from modelhost.speechjobs import SpeechJobRunner
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
    # The owner of each model's life (load, requests in flight, unload, pin, delete): every
    # inference call runs inside ``lifecycle.acquire(name)``.
    lifecycle: ModelLifecycle
    # Long-form speech jobs (/v1/audio/speech/jobs), in the jobs' database.
    speech_jobs: SpeechJobRunner | None = None
    # The Hugging Face mirror (/hf): the installed repositories, and what it served.
    mirror_index: MirrorIndex | None = None
    mirror_stats: MirrorStats = field(default_factory=MirrorStats)


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def require_api_key(request: Request) -> None:
    """When ``MODELHOST_API_KEY`` is set, require ``Authorization: Bearer <key>``.

    The routes that depend on it are also guarded by ``api.security.ApiKeyGuard``, which
    runs this check before FastAPI reads the body (dependencies run after it)."""
    refusal = api_key_refusal(request.app.state.settings.api_key, request.headers)
    if refusal is not None:
        raise refusal


def api_key_refusal(expected: str | None, headers: Mapping[str, str]) -> Unauthorized | None:
    """The 401 for a request whose headers lack the key, or None (also when no key is set)."""
    if not expected:
        return None
    header = headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not _same_key(token.strip(), expected):
        return Unauthorized(
            "This server requires an API key: send 'Authorization: Bearer <MODELHOST_API_KEY>'",
            error="Missing or wrong API key",
        )
    return None


# The name pattern, shown in the schema. Not enforced by FastAPI: validate_name answers a
# bad name with a 400 that says what a name may hold (and also refuses '..').
NAME_DOC = "a model name: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
ModelNamePath = Annotated[str, Path(description=NAME_DOC, json_schema_extra=NAME_SCHEMA)]
ModelNameQuery = Annotated[str, Query(description=NAME_DOC, json_schema_extra=NAME_SCHEMA)]


def _same_key(token: str, expected: str) -> bool:
    """Constant-time comparison of the sent token with the key, as bytes: Starlette decodes
    header bytes as latin-1 (so this recovers exactly what was sent), and
    ``compare_digest`` on str accepts ASCII only (a non-ASCII token would raise)."""
    return secrets.compare_digest(token.encode("latin-1"), expected.encode("utf-8"))


def first_invalid_text(value: object, where: str = "") -> str | None:
    """Where in ``value`` (nested lists and objects, keys too) a string holds a lone UTF-16
    surrogate, which JSON's ``\\ud800`` escapes can smuggle in but no text is made of;
    ``None`` when every string is valid Unicode text."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            surrogate = f"U+{ord(value[exc.start]):04X}"
            return (
                f"{where or 'the body'} holds a lone surrogate {surrogate} at character {exc.start}"
            )
        return None
    if isinstance(value, dict):
        items = value.items()
        for key in value:
            found = first_invalid_text(key, f"a key of {where or 'the body'}")
            if found:
                return found
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = first_invalid_text(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


async def require_valid_text(request: Request) -> None:
    """Refuse a JSON body whose strings are not valid Unicode text (400) before a handler
    passes them to a tokenizer or echoes them in a response, where they would fail."""
    if "json" not in request.headers.get("content-type", ""):
        return
    try:
        body = await request.json()  # FastAPI has parsed it already: this is its cache
    except ValueError:
        return  # not JSON: the body's own validation answers 422
    found = first_invalid_text(body)
    if found:
        raise InvalidRequest(
            f"input is not valid Unicode text: {found}. Send text as UTF-8 "
            "(JSON \\uXXXX escapes must pair surrogates)",
            error="Invalid input",
        )


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
