"""Server-Sent Events, parsed from a stream of lines (the server's progress streams)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Message:
    """One SSE message: its ``event`` name and its JSON ``data``."""

    event: str
    data: Any


def messages(lines: Iterable[str]) -> Iterator[Message]:
    """Each message of an SSE stream; comment lines (``: ping``) are skipped."""
    event: str | None = None
    data: list[str] = []
    for line in lines:
        if line.startswith(":"):
            continue
        if not line:
            if data:
                yield Message(event or "message", json.loads("\n".join(data)))
            event, data = None, []
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
    if data:  # a stream cut after its last data line
        yield Message(event or "message", json.loads("\n".join(data)))
