"""Smoke test of bench/fetch.py: one small round against a real nginx, JSON checked."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "fetch.py"
NGINX = "/usr/sbin/nginx"
MIB = 1024 * 1024
KEYS = {
    "size_bytes",
    "rounds",
    "engine_mode",
    "engine_mib_per_s",
    "curl_mib_per_s",
    "engine_inprocess_mib_per_s",
    "round_ratios",
    "ratio",
    "curl_fsync",
    "runs",
    "note",
    "settle_s",
}


def run_bench(workdir: Path, *extra: str) -> dict:
    """Run the benchmark as a subprocess with --json and return the parsed summary."""
    args = ["--size-mb", "16", "--settle-s", "0", "--json", "--workdir", str(workdir), *extra]
    result = subprocess.run(
        [sys.executable, str(BENCH), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(autouse=True)
def _needs_nginx() -> None:
    if not os.access(NGINX, os.X_OK):
        pytest.skip("nginx not installed: apt-get install nginx-light")


def test_one_round_json_is_consistent(tmp_path: Path) -> None:
    summary = run_bench(tmp_path, "--rounds", "1")

    assert KEYS <= summary.keys()
    assert summary["size_bytes"] == 16 * MIB
    assert summary["rounds"] == 1
    assert summary["engine_mib_per_s"] > 0
    assert summary["curl_mib_per_s"] > 0
    runs = summary["runs"]
    assert sorted(r["tool"] for r in runs) == ["curl", "engine"]
    assert runs[0]["tool"] == "curl"  # round 0: curl first

    # Recompute throughput from each run's seconds, and the ratio from those.
    by_tool = {r["tool"]: summary["size_bytes"] / MIB / r["seconds"] for r in runs}
    assert by_tool["engine"] == pytest.approx(summary["engine_mib_per_s"], abs=1e-9)
    assert by_tool["curl"] == pytest.approx(summary["curl_mib_per_s"], abs=1e-9)
    assert summary["ratio"] == pytest.approx(by_tool["engine"] / by_tool["curl"], abs=1e-9)

    # The served file is kept for reuse; every download was deleted.
    leftovers = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert leftovers == ["big.bin"]


def test_two_rounds_alternate_and_curl_fsync_ratio(tmp_path: Path) -> None:
    summary = run_bench(tmp_path, "--rounds", "2", "--curl-fsync")

    assert [(r["round"], r["tool"]) for r in summary["runs"]] == [
        (0, "curl"),
        (0, "engine"),
        (1, "engine"),
        (1, "curl"),
    ]
    size_mib = summary["size_bytes"] / MIB
    engine = {r["round"]: size_mib / r["seconds"] for r in summary["runs"] if r["tool"] == "engine"}
    curl = {r["round"]: r for r in summary["runs"] if r["tool"] == "curl"}
    ratios = [engine[i] / (size_mib / curl[i]["seconds"]) for i in (0, 1)]
    synced = [engine[i] / (size_mib / curl[i]["seconds_with_sync"]) for i in (0, 1)]
    assert summary["ratio"] == pytest.approx(statistics.median(ratios), abs=1e-9)
    assert summary["ratio_vs_curl_sync"] == pytest.approx(statistics.median(synced), abs=1e-9)
    for i in (0, 1):
        assert curl[i]["seconds_with_sync"] >= curl[i]["seconds"]
