"""Smoke test of bench/hub_fetch.py: one small round (test Hub + nginx + a modelhost server)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_tool

# Timing-sensitive: run alone, after the parallel pass (see pyproject's markers).
pytestmark = pytest.mark.serial

BENCH = Path(__file__).resolve().parent.parent / "bench" / "hub_fetch.py"
NGINX = "/usr/sbin/nginx"
MIB = 1024 * 1024
KEYS = {
    "size_bytes",
    "rounds",
    "modelhost_mib_per_s",
    "snapshot_download_mib_per_s",
    "round_time_ratios",
    "time_ratio",
    "runs",
    "files",
    "shards",
    "parallel_files",
    "snapshot_download_max_workers",
    "settle_s",
    "note",
}
RUN_KEYS = {"round", "tool", "seconds", "mib_per_s", "wall_seconds", "post_seconds"}


def test_one_round_json_is_consistent(tmp_path: Path) -> None:
    need_tool(NGINX, "apt-get install nginx-light")
    args = ["--size-mb", "32", "--files", "6", "--rounds", "1", "--json"]
    args += ["--settle-s", "0", "--workdir", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)

    assert KEYS <= summary.keys()
    assert summary["rounds"] == 1
    assert summary["files"] == 6 + 5  # shards plus the small json files
    assert summary["size_bytes"] > 32 * MIB
    assert summary["parallel_files"] == 4
    assert summary["snapshot_download_max_workers"] == 8
    assert summary["modelhost_mib_per_s"] > 0
    assert summary["snapshot_download_mib_per_s"] > 0
    runs = summary["runs"]
    assert all(RUN_KEYS <= r.keys() for r in runs)
    assert [r["tool"] for r in runs] == ["snapshot_download", "modelhost"]  # round 0 order

    # Throughput is total bytes / seconds for both; the time ratio follows from the seconds.
    mib = summary["size_bytes"] / MIB
    speed = {r["tool"]: mib / r["seconds"] for r in runs}
    assert speed["modelhost"] == pytest.approx(summary["modelhost_mib_per_s"], abs=1e-9)
    assert speed["snapshot_download"] == pytest.approx(
        summary["snapshot_download_mib_per_s"], abs=1e-9
    )
    seconds = {r["tool"]: r["seconds"] for r in runs}
    expected = seconds["modelhost"] / seconds["snapshot_download"]  # below 1: modelhost faster
    assert summary["time_ratio"] == pytest.approx(expected, abs=1e-9)
    assert summary["round_time_ratios"] == pytest.approx([expected], abs=1e-9)
    assert "ratio" not in summary and "round_ratios" not in summary  # no throughput ratio left

    # Generated data is kept for reuse; every run's output was deleted.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cdn", "repo"]
