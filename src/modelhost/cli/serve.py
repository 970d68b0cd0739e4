"""``modelhost serve``: the HTTP server itself (the only command that imports it)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)
# On SIGTERM, requests still running after this long are cancelled; then the job manager
# aborts plans and transfers (leaving them resumable), so the process ends within seconds.
GRACEFUL_SHUTDOWN_S = 5


def serve(
    host: Optional[str] = typer.Option(None, help="Bind address (env MODELHOST_HOST)"),  # noqa: UP045
    port: Optional[int] = typer.Option(None, help="Port (env MODELHOST_PORT)"),  # noqa: UP045
    home: Optional[Path] = typer.Option(None, help="Cache and state (env MODELHOST_HOME)"),  # noqa: UP045
    log_level: str = typer.Option("info", help="uvicorn log level"),
) -> None:
    """Start the HTTP server (flags override MODELHOST_* environment variables)."""
    # Imported here: the client commands must not pay for pydantic-settings, uvicorn, torch.
    import uvicorn
    from pydantic import ValidationError

    from modelhost.config import Settings

    overrides = {
        k: v for k, v in {"host": host, "port": port, "home": home}.items() if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            console.print(f"[red]configuration error:[/red] {error['msg']}")
        raise typer.Exit(2) from None
    from modelhost.api.app import create_app

    console.print(f"modelhost on http://{settings.host}:{settings.port}  (home: {settings.home})")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
