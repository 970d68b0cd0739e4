"""``modelhost serve``: the HTTP server itself (the only command that imports it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console

if TYPE_CHECKING:
    from modelhost.config import Settings
    from modelhost.homelock import HomeLock

console = Console(stderr=True)
# On SIGTERM, requests still running after this long are cancelled; then the job manager
# aborts plans and transfers (leaving them resumable) and speech jobs stop where they are,
# each step bounded, so the process ends within 10 s whatever runs (tests/test_shutdown.py):
# at worst 3 s here, then speech jobs 1.5 s, downloads 3 s (jobs.manager.STOP_WAIT_S) and
# the unload at exit 1 s (api.app.UNLOAD_AT_EXIT_S), one after the other.
GRACEFUL_SHUTDOWN_S = 3
# The client commands' default server (cli/client.py: DEFAULT_URL), restated: the hint
# names MODELHOST_URL only when the clients would not find this server by default.
CLIENT_DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_HOME_IN_USE = 1
EXIT_STARTUP_FAILED = 3  # uvicorn's own status for a failed startup (e.g. the port is taken)


def local_url(settings: Settings) -> str:
    """Where a client on this machine reaches the server (a wildcard bind via loopback)."""
    host = settings.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    elif ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def next_steps(url: str) -> list[str]:
    """The lines printed once the server listens: the dashboard and two commands to try
    (and how clients find a server that is not at their default address)."""
    lines = [
        f"Dashboard: {url}/",
        'Next: modelhost run mms_tts_eng "Hello there"   (pulls, loads and speaks a model)',
        "      modelhost catalog, then modelhost pull NAME   (or a Hub id such as org/model)",
    ]
    if url != CLIENT_DEFAULT_URL:
        lines.append(f"Clients: export MODELHOST_URL={url}")
    return lines


def serve(
    host: Optional[str] = typer.Option(None, help="Bind address (env MODELHOST_HOST)"),  # noqa: UP045
    port: Optional[int] = typer.Option(None, help="Port (env MODELHOST_PORT)"),  # noqa: UP045
    home: Optional[Path] = typer.Option(None, help="Cache and state (env MODELHOST_HOME)"),  # noqa: UP045
    log_level: str = typer.Option("info", help="uvicorn log level"),
) -> None:
    """Start the HTTP server (flags override MODELHOST_* environment variables)."""
    # Imported here: the client commands must not pay for pydantic-settings, uvicorn, torch.
    from pydantic import ValidationError

    from modelhost.config import Settings
    from modelhost.errors import HomeInUse
    from modelhost.homelock import acquire

    overrides = {
        k: v for k, v in {"host": host, "port": port, "home": home}.items() if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            console.print(f"[red]configuration error:[/red] {error['msg']}")
        raise typer.Exit(2) from None
    url = local_url(settings)
    # Taken before the server is imported: a second server on this home says who holds it
    # and exits at once, without a traceback and without importing the server.
    try:
        lock = acquire(settings.home, url)
    except HomeInUse as exc:
        console.print(f"modelhost: {exc.message}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_HOME_IN_USE) from None
    try:
        _run(settings, lock, url, log_level)
    finally:
        lock.release()


def _run(settings: Settings, lock: HomeLock, url: str, log_level: str) -> None:
    """Run uvicorn until it stops; exit non-zero when its startup failed."""
    import uvicorn

    from modelhost.api.app import create_app
    from modelhost.api.zerocopy import ZeroCopyH11Protocol

    class AnnouncingServer(uvicorn.Server):
        """uvicorn's server, printing the next steps once it listens (not before)."""

        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                for line in next_steps(url):
                    console.print(line, markup=False, highlight=False, soft_wrap=True)

    console.print(
        f"modelhost on http://{settings.host}:{settings.port}  (home: {settings.home})",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    config = uvicorn.Config(
        create_app(settings, home_lock=lock),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        # uvicorn's h11 protocol plus zero-copy file sending (the mirror's files: sendfile).
        http=ZeroCopyH11Protocol,
    )
    server = AnnouncingServer(config)
    server.run()
    if not server.started:
        raise typer.Exit(EXIT_STARTUP_FAILED)
