"""Tables and JSON for the reading commands."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

# Columns that give way when the terminal is narrow (the others keep their whole values).
FOLDING = frozenset({"MODEL ID", "MESSAGE", "FILE", "TASK"})


def print_json(data: Any) -> None:
    """The server's JSON, indented, on stdout (plain: no colours for scripts to strip)."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def human_bytes(count: float | None) -> str:
    """'1.5 MB' (decimal units, as the server's *_mb fields)."""
    if count is None:
        return "?"
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover - the loop returns at GB


def human_seconds(seconds: float | None) -> str:
    """'42s', '3m05s', '2h10m'."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def idle_seconds(last_used: str | None, now: datetime | None = None) -> float | None:
    """Seconds since an ISO time (naive times are UTC, as the server writes them)."""
    if not last_used:
        return None
    when = datetime.fromisoformat(last_used)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, ((now or datetime.now(timezone.utc)) - when).total_seconds())


def _table(*headers: str) -> Table:
    """A borderless table: the long free-text columns fold, the short ones stay whole."""
    table = Table(box=None, pad_edge=False)
    for header in headers:
        if header in FOLDING:
            table.add_column(header, overflow="fold")
        else:
            table.add_column(header, no_wrap=True)
    return table


def installed_table(infos: list[dict[str, Any]], loaded: set[str]) -> Table:
    """``modelhost ls``: one row per installed model."""
    table = _table("NAME", "SOURCE", "MODEL ID", "SIZE", "REVISION", "LOADED")
    for info in infos:
        revision = info.get("revision") or ""
        table.add_row(
            info["name"],
            info.get("source") or "",
            info.get("model_id") or "",
            human_bytes(info.get("size_bytes")),
            revision[:12],
            "yes" if info["name"] in loaded else "no",
        )
    return table


def managed_table(rows: list[dict[str, Any]]) -> Table:
    """``modelhost ps``: one row per loaded model."""
    table = _table("NAME", "DEVICE", "MEMORY", "PINNED", "IDLE", "UNLOADS IN", "TASK")
    for row in rows:
        memory = (row.get("memory_usage") or {}).get("allocated_mb")
        table.add_row(
            row["name"],
            row.get("device") or "",
            "?" if memory is None else f"{memory:.1f} MiB",
            "yes" if row.get("pinned") else "no",
            human_seconds(idle_seconds(row.get("last_used"))),
            unloads_in(row),
            row.get("task") or "",
        )
    return table


def unloads_in(row: dict[str, Any]) -> str:
    """When an idle model is unloaded: 'never' (pinned, keep-alive -1), '-' while in use."""
    if row.get("pinned") or row.get("keep_alive_s") == -1:
        return "never"
    seconds = row.get("unloads_in_s")
    return "-" if seconds is None else human_seconds(seconds)


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    """``modelhost status``: one row per download job."""
    table = _table("ID", "NAME", "STATUS", "PHASE", "PROGRESS", "BYTES", "MESSAGE")
    for job in jobs:
        table.add_row(
            job["download_id"],
            job.get("model_name") or "",
            job.get("status") or "",
            job.get("phase") or "",
            f"{job.get('progress') or 0:.1f}%",
            f"{human_bytes(job.get('bytes_downloaded'))} / {human_bytes(job.get('bytes_total'))}",
            job.get("message") or "",
        )
    return table


def catalog_table(body: dict[str, Any]) -> Table:
    """``modelhost catalog``: the downloadable models."""
    table = _table("NAME", "SOURCE", "MODEL ID", "TASK", "SIZE", "INSTALLED")
    for name, entry in (body.get("available_models") or {}).items():
        request = entry.get("download_request") or {}
        size = entry.get("size_mb")
        table.add_row(
            name,
            request.get("source") or entry.get("source") or "",
            request.get("model_id") or entry.get("model_id") or "",
            request.get("task") or entry.get("task") or "",
            "?" if size is None else f"{size:.1f} MB",
            ", ".join(entry.get("installed_as") or []) or "no",
        )
    return table


def show_manifest(console: Console, info: dict[str, Any]) -> None:
    """``modelhost show``: the manifest's fields, then its files."""
    fields = Table(box=None, show_header=False, pad_edge=False)
    for key in (
        "name",
        "source",
        "model_id",
        "revision",
        "task",
        "path",
        "downloaded_at",
        "last_used",
        "pinned",
        "download_id",
    ):
        if info.get(key) is not None:
            fields.add_row(Text(key, style="bold"), str(info[key]))
    fields.add_row(Text("size", style="bold"), human_bytes(info.get("total_size_bytes")))
    console.print(fields)
    files = _table("FILE", "SIZE", "SHA256")
    for entry in info.get("files") or []:
        files.add_row(entry["path"], human_bytes(entry.get("size")), entry.get("sha256", "")[:16])
    console.print(files)
    if info.get("conversions"):
        console.print(f"converted from pickle: {len(info['conversions'])} file(s)")
