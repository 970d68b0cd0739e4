"""The ``modelhost`` command's Typer app and what every command shares.

The app, its global options (``main``: ``--url``, ``--api-key``, ``--version``), the HTTP
client of this invocation (``client()``, ``state()``), the two consoles (``out``, ``err``)
and ``handled``, which turns a ``CliError`` into one line on stderr. The command modules
import these from here and register themselves on ``app``; the package (``modelhost.cli``)
imports those modules, so nothing here may import them back.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console

from modelhost import __version__
from modelhost.cli.client import DEFAULT_URL, Client, CliError, ServerUnreachable

app = typer.Typer(
    help="modelhost: a self-hosted model-management server.",
    no_args_is_help=True,
    invoke_without_command=True,
    pretty_exceptions_enable=False,
)
# Server text (messages, names, paths) is printed as it is: no markup, no guessed colours.
# Piped output is not cut to 80 columns: scripts and logs get whole rows.
PIPE_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 250
out = Console(highlight=False, markup=False, width=PIPE_WIDTH)
err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])
# One invocation per process: the callback sets this before the command runs.
_current: State | None = None


class State:
    """The global options; the client is made on first use (``--help`` makes none)."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url
        self.api_key = api_key
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.url, self.api_key)
        return self._client


def state() -> State:
    """The current invocation's global options (from the environment if no callback ran)."""
    global _current
    if _current is None:
        url = os.environ.get("MODELHOST_URL", DEFAULT_URL)
        _current = State(url, os.environ.get("MODELHOST_API_KEY"))
    return _current


def client() -> Client:
    """The HTTP client of this invocation."""
    return state().client


def handled(command: F) -> F:
    """Report ``CliError`` as one line on stderr and exit 1, never with a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CliError as exc:
            err.print(exc.message)
            raise typer.Exit(exc.code) from None
        except OSError as exc:  # a local file a command could not use: name it, no traceback
            err.print(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def print_versions(url: str, api_key: str | None) -> None:
    """The client's version, and the server's when one answers at ``url``."""
    typer.echo(f"modelhost client {__version__}")
    try:
        health = Client(url, api_key).get("/health")
        typer.echo(f"modelhost server {health.get('version')} at {url}")
    except ServerUnreachable:
        typer.echo(f"no server at {url}")
    except CliError as exc:
        typer.echo(f"server at {url}: {exc.message}")


@app.callback()
def main(
    ctx: typer.Context,
    url: str = typer.Option(DEFAULT_URL, "--url", envvar="MODELHOST_URL", help="Server URL"),
    api_key: Optional[str] = typer.Option(  # noqa: UP045 - typer needs Optional on 3.10
        None, "--api-key", envvar="MODELHOST_API_KEY", help="API key (sent as a bearer token)"
    ),
    version: bool = typer.Option(False, "--version", help="Client and server versions"),
) -> None:
    """modelhost: fetch, verify, cache and serve machine-learning models."""
    global _current
    _current = State(url, api_key)
    if version:
        print_versions(url, api_key)
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
