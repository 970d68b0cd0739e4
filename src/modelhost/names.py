"""Validation of user-chosen names; no request value becomes a path without it."""

from __future__ import annotations

import re

from modelhost.errors import InvalidName, InvalidRequest

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# The whole rule as one pattern (the lookahead refuses '..'), for the OpenAPI schema: it
# promises exactly what validate_name accepts. (pydantic's regex engine has no lookahead, so
# fields that pydantic checks keep NAME_PATTERN and show this one.)
NAME_SCHEMA_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# A name's JSON Schema keywords, for every field and parameter that holds a model name.
NAME_SCHEMA = {"pattern": NAME_SCHEMA_PATTERN}

# A request's ``device``: its syntax (runtime/device.py checks it; whether this machine has the
# device is the server's to say, with a 409), and the same as JSON Schema for the OpenAPI schema.
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]+)?)$"
DEVICE_SCHEMA = {"anyOf": [{"type": "string", "pattern": DEVICE_PATTERN}, {"type": "null"}]}


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise ``InvalidName`` saying why."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        shown = name if isinstance(name, str) and len(name) <= 40 else f"{str(name)[:40]}..."
        raise InvalidName(
            f"Invalid model name {shown!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no slashes, no '..')"
        )
    return name


# Linux's limits: NAME_MAX bytes per path component, PATH_MAX bytes for a whole path. A model
# file's path must leave room under PATH_MAX for the store's own prefix (home, models/<name>/,
# a staging name), so the relative path gets what is left after that budget.
NAME_MAX = 255
PATH_MAX = 4096
STORE_PREFIX_BUDGET = 1024


def shorten(text: str, keep: int = 60) -> str:
    """``text`` cut in the middle to about ``keep`` characters, for messages."""
    if len(text) <= keep:
        return text
    half = keep // 2
    return f"{text[:half]}...{text[-half:]} ({len(text)} characters)"


def check_path_limits(path: str) -> str:
    """Return ``path`` if every component and the whole fit the filesystem's limits.

    Raises ``InvalidRequest`` ("file name too long") naming a shortened form of the path: a
    name the filesystem cannot hold would otherwise fail half-way through an install.
    """
    longest = max(path.split("/"), key=lambda part: len(part.encode()))
    if len(longest.encode()) > NAME_MAX:
        raise InvalidRequest(
            f"File name too long for the filesystem: {shorten(path)!r} has a component of "
            f"{len(longest.encode())} bytes (the limit is {NAME_MAX} bytes per component); "
            "nothing was installed",
            error="File name too long",
        )
    if len(path.encode()) > PATH_MAX - STORE_PREFIX_BUDGET:
        raise InvalidRequest(
            f"File path too long for the filesystem: {shorten(path)!r} is "
            f"{len(path.encode())} bytes (PATH_MAX is {PATH_MAX} bytes, of which "
            f"{STORE_PREFIX_BUDGET} are kept for the cache's own directories); "
            "nothing was installed",
            error="File name too long",
        )
    return path
