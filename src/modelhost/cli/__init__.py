"""The ``modelhost`` command line: a client of the HTTP API (and ``serve``, the server).

Nothing here imports the server (torch, fastapi, the job manager): every command but
``serve`` talks HTTP to ``MODELHOST_URL``, so ``modelhost ls`` starts in a fraction of a
second. ``serve`` imports the server inside its function.

The app and what the commands share live in ``cli/app.py``; this package imports the
command modules, which register themselves on it, and re-exports ``app`` for the console
script (``modelhost.cli:app``).
"""

from __future__ import annotations

import sys

from modelhost.cli import commands as _commands  # noqa: F401 - registers the commands
from modelhost.cli import run as _run  # noqa: F401 - registers `run`
from modelhost.cli.app import app, client, err, handled, out, state
from modelhost.cli.serve import serve

app.command()(serve)

__all__ = ["app", "client", "handled", "out", "err", "state"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
