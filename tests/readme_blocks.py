"""The code blocks of a Markdown file, with what their fences say about running them.

A fence's info string is the language, then words:

* ```` ```bash runnable ```` — a user runs it as written; ``tests/test_readme.py`` runs it,
  in order, on a plain install against a loopback Hub and checks its exit code. A block
  tagged ``runnable install`` is the Quick start's install, ``runnable serve`` the server
  command (run in the background until the other blocks are done).
* ```` ```bash not-runnable: <why> ```` — needs what a test machine lacks (a GPU, the real Hub,
  a server elsewhere): checked for syntax only (``bash -n``).
* A ```` ```text output ```` block right after a runnable block documents what it prints: each
  non-empty line must appear in the output, in order; ``…`` inside a line matches anything.

Every ``bash`` block of the README carries one of the two tags, so an example cannot drift
into "never checked" by accident.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^(?P<indent> *)(?P<ticks>`{3,})(?P<info>[^`]*)$")


@dataclass
class Block:
    """One fenced block: its language, tags, code and the line its fence opens on."""

    language: str
    tags: list[str]
    code: str
    line: int
    reason: str = ""
    expected: list[str] = field(default_factory=list)

    @property
    def runnable(self) -> bool:
        return "runnable" in self.tags

    @property
    def role(self) -> str:
        """``install``, ``serve`` or ``example``."""
        for role in ("install", "serve"):
            if role in self.tags:
                return role
        return "example"

    def label(self, path: Path) -> str:
        first = self.code.strip().splitlines()[0] if self.code.strip() else ""
        return f"{path.name}:{self.line}: {first[:70]}"


def parse_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text`` in order; a ``text output`` block is attached to the
    block before it as ``expected`` lines instead of being listed itself."""
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        start, ticks, info = index, match["ticks"], match["info"].strip()
        body: list[str] = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(ticks):
            body.append(lines[index])
            index += 1
        index += 1
        head, _, reason = info.partition(":")
        words = head.split()
        language, tags = (words[0], words[1:]) if words else ("", [])
        if language == "text" and "output" in tags and blocks:
            blocks[-1].expected = [line.strip() for line in body if line.strip()]
            continue
        blocks.append(Block(language, tags, "\n".join(body) + "\n", start + 1, reason.strip()))
    return blocks


def output_matches(expected: list[str], output: str) -> str | None:
    """None when every expected line is found in ``output`` in order, else the first missing."""
    position = 0
    for line in expected:
        pattern = ".*?".join(re.escape(part) for part in line.split("…"))
        found = re.compile(pattern).search(output, position)
        if found is None:
            return line
        position = found.end()
    return None
