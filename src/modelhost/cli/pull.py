"""``modelhost pull``: start a download, then follow its event stream to the end.

Ctrl-C while following asks whether to cancel; the job itself runs on the server, so
leaving it running is a real choice.
"""

from __future__ import annotations

import difflib
import re
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console
from rich.text import Text

from modelhost.cli.client import Client, CliError
from modelhost.cli.progress import TERMINAL, JobView, make_progress
from modelhost.cli.sse import messages

# The server's rule (modelhost.names.NAME_PATTERN), restated so the client imports no
# server module: 1-128 of these characters, starting with a letter or digit, no "..".
_INVALID = re.compile(r"[^a-z0-9._-]+")
MAX_NAME = 128
EXIT_INTERRUPTED = 130


def split_spec(spec: str) -> tuple[str, str]:
    """``source:model_id`` split at the FIRST colon (url ids hold colons of their own)."""
    source, sep, model_id = spec.partition(":")
    if not sep or not source or not model_id:
        raise CliError(f"expected SOURCE:MODEL_ID (e.g. huggingface:org/model), got {spec!r}")
    return source, model_id


def resolve(client: Client, spec: str, installed: list[str] | None = None) -> dict[str, Any]:
    """The ``POST /models/download`` body ``spec`` names, before any flag: ``SOURCE:MODEL_ID``,
    a bare Hub id ``ORG/NAME`` (huggingface), or a catalog name (the catalog's own request:
    its source, model id, task, vocoder). Only a bare word asks the server for the catalog.
    ``installed``: the caller also took installed names (``run``), so an unknown word's
    error says so and suggests them too."""
    if ":" in spec:
        source, model_id = split_spec(spec)
    elif "/" in spec:
        source, model_id = "huggingface", spec
    else:
        return catalog_request(client, spec, installed)
    return {"source": source, "model_id": model_id, "name": derive_name(source, model_id)}


def catalog_request(
    client: Client, name: str, installed: list[str] | None = None
) -> dict[str, Any]:
    """The catalog entry ``name``'s download request; an error naming close entries."""
    entries = client.get("/models/available").get("available_models") or {}
    if name in entries:
        return dict(entries[name]["download_request"])
    raise CliError(unknown_name_message(name, list(entries), installed))


def unknown_name_message(name: str, catalog: list[str], installed: list[str] | None) -> str:
    """Why ``name`` names nothing, with the closest known names (``-`` and ``_`` alike)."""
    keys: dict[str, list[str]] = {}
    for entry in dict.fromkeys([*catalog, *(installed or [])]):
        keys.setdefault(entry.lower().replace("-", "_"), []).append(entry)
    close = difflib.get_close_matches(name.lower().replace("-", "_"), list(keys), n=5, cutoff=0.5)
    names = [entry for key in close for entry in keys[key]]
    hint = f"; did you mean {', '.join(names)}?" if names else ""
    kinds = "an installed model, " if installed is not None else ""
    return (
        f"{name!r} is not {kinds}a catalog name, SOURCE:MODEL_ID or a Hub id ORG/NAME"
        f"{hint} (`modelhost catalog` lists the catalog)"
    )


def derive_name(source: str, model_id: str) -> str:
    """A valid model name from the id: its last path segment (a url's without the
    extension), lowercased, other characters as '-'."""
    text = model_id
    if source == "url":
        text = urlsplit(model_id).path or model_id
    last = text.rstrip("/").rsplit("/", 1)[-1] or text
    if source == "url" and "." in last.lstrip("."):
        last = last.rsplit(".", 1)[0]
    name = _INVALID.sub("-", last.lower())
    while ".." in name:
        name = name.replace("..", ".")
    name = name.lstrip("._-")[:MAX_NAME].rstrip("._-")
    return name or "model"


def follow(client: Client, download_id: str, console: Console) -> dict[str, Any]:
    """Draw the job's progress until its stream's final message; that message's data.

    KeyboardInterrupt propagates (the caller asks what to do); the display is closed first.
    """
    progress = make_progress(console)
    view = JobView(progress, console)
    with progress, client.stream(f"/models/download/{download_id}/events") as response:
        for message in messages(response.iter_lines()):
            if message.event not in ("status", "progress"):
                continue
            view.update(message.data)
            if message.event == "status" and message.data.get("status") in TERMINAL:
                return message.data
    # The stream ended without a final state (the server stopped): ask for the state once.
    state = client.get(f"/models/download/status/{download_id}")
    if state.get("status") not in TERMINAL:
        raise CliError(
            f"the progress stream of {download_id} ended while the job was "
            f"{state.get('status')}; follow it with `modelhost status {download_id}`"
        )
    return state


def ask_cancel(client: Client, download_id: str, console: Console) -> int:
    """After Ctrl-C: cancel the job (exit 130) or leave it running on the server (exit 0)."""
    try:
        answer = input("Cancel the download? [y/N] ")  # plain: no markup, no highlighting
    except (KeyboardInterrupt, EOFError):
        answer = ""
        console.print()
    if answer.strip().lower() in ("y", "yes"):
        body = client.post(f"/models/download/{download_id}/cancel")
        console.print(
            f"{body.get('status')}: {body.get('message') or ''}".rstrip(": "), soft_wrap=True
        )
        return EXIT_INTERRUPTED
    console.print(
        f"The download keeps running on the server (id {download_id}); "
        f"follow it with `modelhost status {download_id}`",
        soft_wrap=True,
    )
    return 0


def outcome(final: dict[str, Any], console: Console) -> int:
    """Print the job's last message; 0 when it completed, 1 otherwise."""
    message = final.get("message") or final.get("error") or final.get("status")
    if final.get("status") == "completed":
        console.print(
            Text("completed", style="green").append(f"  {message}", style=""), soft_wrap=True
        )
        return 0
    console.print(
        Text(str(final.get("status")), style="red").append(f"  {message}", style=""), soft_wrap=True
    )
    return 1
