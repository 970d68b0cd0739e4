"""Status endpoint latency while downloads run, relative to the same server idle.

Run it from the repository root, with the package installed::

    python bench/status_latency.py                 # 2 x 1 GiB downloads, 3 rounds
    python bench/status_latency.py --size-mb 256 --rounds 5 --json

It starts nginx on loopback serving two ``--size-mb`` MiB files and a modelhost server (a
subprocess, ``MODELHOST_MAX_DOWNLOADS=2``). Each round alternates two phases on the same
server: *idle* (no transfer) and *busy* (both files downloading at full speed, verified).
In each phase one client sends ``GET /models/download/status/{id}`` back to back, for a
finished job (read from the database) and, when busy, for a running one (live progress).
A third phase is the reference: the server idle while two ``curl`` processes move the same
two files, which shows what the machine's own load (loopback TCP, page cache, two cores)
does to the tail without any work inside modelhost. It prints p50/p99 per phase, and the
medians over rounds of p99(busy) / p99(idle) (the target is <= 2) and of
p99(busy) / p99(curl load).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from fetch import BenchError, ensure_data_file, nginx_serving
from modelhost_server import start_modelhost

MIB = 1024 * 1024


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(samples)
    index = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


def sample(client: httpx.Client, job_id: str, seconds: float, until=None) -> list[float]:
    """Back-to-back status requests for ``seconds`` (or until ``until()`` is true)."""
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (until and until()):
        started = time.perf_counter()
        response = client.get(f"/models/download/status/{job_id}")
        latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise BenchError(f"status answered {response.status_code}: {response.text}")
    return latencies


def download(client: httpx.Client, url: str, name: str) -> str:
    response = client.post(
        "/models/download", json={"source": "url", "model_id": url, "name": name}
    )
    if response.status_code != 202:
        raise BenchError(f"download refused: {response.text}")
    return response.json()["download_id"]


def curl_phase(client: httpx.Client, base_url: str, done_id: str, scratch: Path) -> list[float]:
    """The reference load: curl moves the same two files while the server sits idle."""
    outputs = [scratch / f"curl-{n}.out" for n in ("a", "b")]
    processes = [
        subprocess.Popen(["curl", "-s", "-o", str(out), f"{base_url}/{n}.safetensors"])
        for out, n in zip(outputs, ("a", "b"), strict=True)
    ]
    latencies: list[float] = []
    while all(p.poll() is None for p in processes):
        latencies += sample(client, done_id, 0.25)
    for process in processes:
        process.wait()
    for out in outputs:
        out.unlink(missing_ok=True)
    return latencies


def one_round(
    client: httpx.Client, base_url: str, done_id: str, seconds: float, scratch: Path
) -> dict:
    idle = sample(client, done_id, seconds)
    reference = curl_phase(client, base_url, done_id, scratch)
    ids = [download(client, f"{base_url}/{n}.safetensors", f"busy-{n}") for n in ("a", "b")]

    def any_finished() -> bool:
        states = [client.get(f"/models/download/status/{i}").json()["status"] for i in ids]
        return any(s != "downloading" for s in states)

    busy_done: list[float] = []
    busy_live: list[float] = []
    while not any_finished():
        busy_done += sample(client, done_id, 0.25)
        busy_live += sample(client, ids[0], 0.25)
    for job_id in ids:
        while client.get(f"/models/download/status/{job_id}").json()["status"] == "downloading":
            time.sleep(0.05)
        if client.get(f"/models/download/status/{job_id}").json()["status"] != "completed":
            raise BenchError(f"download {job_id} did not complete")
    for name in ("a", "b"):
        client.delete(f"/models/download/busy-{name}")
    if len(busy_done) < 100:
        raise BenchError("downloads finished too fast for a busy sample; raise --size-mb")
    return {
        "idle_p50_ms": percentile(idle, 50) * 1e3,
        "idle_p99_ms": percentile(idle, 99) * 1e3,
        "busy_p50_ms": percentile(busy_done, 50) * 1e3,
        "busy_p99_ms": percentile(busy_done, 99) * 1e3,
        "busy_live_p99_ms": percentile(busy_live, 99) * 1e3,
        "curl_p99_ms": percentile(reference, 99) * 1e3,
        "samples": {
            "idle": len(idle),
            "busy": len(busy_done),
            "busy_live": len(busy_live),
            "curl": len(reference),
        },
        "ratio_p99": percentile(busy_done, 99) / percentile(idle, 99),
        "ratio_p99_vs_curl": percentile(busy_done, 99) / percentile(reference, 99),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--rate-mb",
        type=float,
        default=None,
        help="cap each download at this many MiB/s (nginx limit_rate), like a remote host",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="modelhost-latency-"))
    root = workdir / "www"
    root.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b"):
        ensure_data_file(root / f"{name}.safetensors", args.size_mb * MIB)
    (root / "done.safetensors").write_bytes(os.urandom(MIB))
    home = workdir / "home"
    shutil.rmtree(home, ignore_errors=True)
    rounds = []
    limit = int(args.rate_mb * MIB) if args.rate_mb else None
    with nginx_serving(root, workdir / "nginx", limit) as nginx_port:
        base_url = f"http://127.0.0.1:{nginx_port}"
        process, api = start_modelhost(
            {
                "MODELHOST_HOME": str(home),
                "MODELHOST_URL_ALLOW": f"127.0.0.1:{nginx_port}",
                "MODELHOST_URL_ALLOW_DEFAULTS": "false",
                "MODELHOST_MAX_DOWNLOADS": "2",
            }
        )
        try:
            with httpx.Client(base_url=api, timeout=30) as client:
                done_id = download(client, f"{base_url}/done.safetensors", "done")
                while client.get(f"/models/download/status/{done_id}").json()["status"] != (
                    "completed"
                ):
                    time.sleep(0.05)
                for number in range(args.rounds):
                    result = one_round(client, base_url, done_id, args.idle_seconds, workdir)
                    rounds.append(result)
                    if not args.json:
                        print(
                            f"round {number + 1}: idle p50 {result['idle_p50_ms']:.2f} ms "
                            f"p99 {result['idle_p99_ms']:.2f} ms | busy p50 "
                            f"{result['busy_p50_ms']:.2f} ms p99 {result['busy_p99_ms']:.2f} ms"
                            f" (running job {result['busy_live_p99_ms']:.2f} ms) | curl moving "
                            f"the same files: p99 {result['curl_p99_ms']:.2f} ms | busy/idle "
                            f"{result['ratio_p99']:.2f}, "
                            f"busy/curl {result['ratio_p99_vs_curl']:.2f}"
                        )
        finally:
            process.terminate()
            process.wait(timeout=30)
    summary = {
        "size_mb": args.size_mb,
        "rate_mb_per_s": args.rate_mb,
        "rounds": rounds,
        "median_ratio_p99": statistics.median(r["ratio_p99"] for r in rounds),
        "median_ratio_p99_vs_curl": statistics.median(r["ratio_p99_vs_curl"] for r in rounds),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"p99 busy/idle (median of {len(rounds)} rounds): {summary['median_ratio_p99']:.2f}")
        print(
            f"p99 busy/curl-load (median of {len(rounds)} rounds): "
            f"{summary['median_ratio_p99_vs_curl']:.2f}"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
