"""Validation of user-chosen names; no request value becomes a path without it."""

from __future__ import annotations

import re

from modelhost.errors import InvalidName

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise ``InvalidName`` saying why."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        shown = name if isinstance(name, str) and len(name) <= 40 else f"{str(name)[:40]}..."
        raise InvalidName(
            f"Invalid model name {shown!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no slashes, no '..')"
        )
    return name
