"""Live rich progress of one download, drawn from its event stream.

One bar per file and a total; the total shows the job's phase (downloading, verifying,
converting, committing, loading) and the server's measured speed and ETA.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
)
from rich.text import Text

from modelhost.cli.render import human_bytes, human_seconds

TERMINAL = frozenset({"completed", "failed", "cancelled"})
TOTAL_KEY = "\0total"  # no file path can hold a NUL


def make_progress(console: Console) -> Progress:
    """The progress display: name, bar, percent, bytes, then speed/ETA or the file's state."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=30),
        TaskProgressColumn(),
        DownloadColumn(binary_units=False),
        TextColumn("{task.fields[info]}"),
        console=console,
        refresh_per_second=8,
    )


class JobView:
    """The bars of one job; ``update`` takes each status/progress message's data."""

    def __init__(self, progress: Progress, console: Console) -> None:
        self.progress = progress
        self.console = console
        self.tasks: dict[str, TaskID] = {}
        self.phase: str | None = None
        self.last: dict[str, Any] | None = None
        self.message = ""

    def update(self, data: dict[str, Any]) -> None:
        """Show ``data`` (the status body plus ``files``): phase line, file bars, total."""
        self.last = data
        phase = data.get("phase") or data.get("status")
        if phase != self.phase:
            self.phase = phase
            if phase not in TERMINAL:
                self._print_phase(phase, data.get("message") or "")
        for entry in data.get("files") or []:
            info = entry.get("status") or ""
            self._set(entry["path"], entry.get("bytes_downloaded"), entry.get("bytes_total"), info)
        done, total = data.get("bytes_downloaded"), data.get("bytes_total")
        self._set(TOTAL_KEY, done, total, _total_info(data))

    def _print_phase(self, phase: str, message: str) -> None:
        """One line per phase; the job's message only when it says something new."""
        line = Text(phase, style="bold")
        if message and message != self.message:
            line.append(f"  {message}", style="")
        self.message = message
        self.console.print(line, soft_wrap=True)

    def _set(self, key: str, done: int | None, total: int | None, info: str) -> None:
        if key not in self.tasks:
            label = self._total_label() if key == TOTAL_KEY else escape(key)
            # Files come before the total in each message, so the total's row is the last.
            self.tasks[key] = self.progress.add_task(label, total=total, info=info)
        task = self.tasks[key]
        fields: dict[str, Any] = {"completed": done or 0, "total": total, "info": info}
        if key == TOTAL_KEY:
            fields["description"] = self._total_label()
        self.progress.update(task, **fields)

    def _total_label(self) -> str:
        # Escaped: "[verifying]" would otherwise be read as rich markup and vanish.
        return escape(f"total [{self.phase}]")


def _total_info(data: dict[str, Any]) -> str:
    speed = data.get("speed_bytes_per_s")
    eta = data.get("eta")
    parts = []
    if speed:
        parts.append(f"{human_bytes(speed)}/s")
    if eta is not None and data.get("status") not in TERMINAL:
        parts.append(f"ETA {human_seconds(eta)}")
    return "  ".join(parts)
