"""Fetch-engine download time relative to curl's, both fetching one file from nginx on loopback.

Run it from the repository root, with the package installed::

    python bench/fetch.py                      # 1 GiB file, 5 rounds
    python bench/fetch.py --size-mb 256 --rounds 9 --curl-fsync --json
    python bench/fetch.py --api                # + modelhost's API vs curl -o + openssl dgst
    python bench/fetch.py --cap-mbps 50 --rounds 3   # 50 MB/s per connection: vs aria2c, curl

Modes (every tool once per round, the order reversed every other round):

* default: ``curl`` and ``engine`` (below).
* ``--api``: also ``curl_sha256`` (``curl -o``, then ``openssl dgst -sha256`` of the output,
  timed together; OpenSSL uses the CPU's SHA instructions) and ``modelhost``: one
  ``python -m modelhost serve`` (fresh ``MODELHOST_HOME``, started before the first round,
  allowed only the loopback nginx), timed from ``POST /models/download`` (url source, the
  sha256 given, ``load: false``) to the job's status ``completed`` (polled every ``POLL_S``):
  fetched, verified, fsynced and committed to the store. The model is deleted after each run.
  Reported: time engine/curl (target <= 1.11) and time modelhost/curl_sha256
  (target <= 1.05), each the median of per-round ratios, with the peer's own MiB/s.
* ``--cap-mbps N``: nginx ``limit_rate`` caps every connection at N MB/s (10^6 bytes, as
  ``MODELHOST_FETCH_MAX_MBPS``); tools ``curl``, ``aria2c -x16 -s16 -k1M`` and ``modelhost``
  (as above; ``MODELHOST_FETCH_*`` variables in the environment reach the server, e.g.
  ``MODELHOST_FETCH_CONNECTIONS``). Reported: time modelhost/aria2c and time modelhost/curl
  (targets <= 1.0). Outputs of curl and aria2c are checked (size, sha256) untimed.

What it measures: a local nginx (``/usr/sbin/nginx``; ``apt-get install nginx-light``) serves
``--size-mb`` MiB of random bytes from ``--workdir``. Each round downloads that file once with
``curl -s -o FILE URL`` and once with ``FetchEngine.fetch`` (given the file's expected sha256,
so the engine verifies it as it always does), alternating which goes first. Both run as fresh
processes timed by wall clock around ``subprocess.run``, so both pay process start-up (Python
and ``import modelhost.fetch`` for the engine). The engine worker also reports the time of the
``fetch`` call alone, shown as ``in-process``.

Every ratio it prints is a time ratio, the convention of docs/performance.md: the tool's
seconds / the reference's for the same file, below 1 when the tool is faster (the median of
the per-round ratios). It prints every run, the median MiB/s of each tool and the time ratio
engine/curl. The engine fsyncs the file and hashes it; curl does neither. ``--curl-fsync``
also times ``sync -d FILE`` after curl and reports a second time ratio, engine/(curl + fsync).
Before every run (untimed) the previous output is deleted, dirty pages are flushed with
``sync`` and the bench waits ``--settle-s`` seconds, so that each run starts from the same
memory state (see ``SETTLE_S``). The served file is kept in the work directory and reused by
the next run with the same size.

Exit status: 0 when every run succeeded and verified, 1 otherwise (2 for bad usage).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

NGINX = "/usr/sbin/nginx"
MIB = 1024 * 1024
CHUNK = 4 * MIB
SERVED_NAME = "big.bin"
WORKER_FLAG = "--engine-worker"
ENGINE_MODE = "subprocess"
MB = 1_000_000  # --cap-mbps is in MB/s of 10^6 bytes, as MODELHOST_FETCH_MAX_MBPS
API_MODEL = "bench-fetch"
API_FILE = "model.safetensors"
POLL_S = 0.025  # status polling interval of the modelhost (API) run
SERVER_START_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 900.0
# The brief's reference for a multi-connection client; the rest only names the output and
# keeps aria2c quiet and from renaming or resuming an older file.
ARIA2C = [
    "aria2c",
    "-x16",
    "-s16",
    "-k1M",
    "-q",
    "--allow-overwrite=true",
    "--auto-file-renaming=false",
    "--continue=false",
    "--summary-interval=0",
]
# On VMs with virtio-balloon free page reporting, memory freed more than ~2 s earlier has been
# handed back to the host, and page-cache writes into it fault it back in, costing up to ~1.5 s
# per GiB on the 2-core dev VM (most for large write() calls). Without a pause, whether a run
# got such cold pages depended on what ran just before it, and the ratio swung between
# invocations; the same pause before every run gives both tools the same, realistic, start.
SETTLE_S = 3.0


class BenchError(Exception):
    """A failure that makes the numbers meaningless: verification, nginx, a tool's error."""


@dataclass
class Run:
    """One timed download."""

    round: int
    tool: str  # "engine" or "curl"
    seconds: float  # wall clock around the subprocess (curl: without the sync)
    mib_per_s: float
    inprocess_seconds: float | None = None  # engine only: the fetch() call alone
    seconds_with_sync: float | None = None  # curl with --curl-fsync: curl, then sync -d
    hash_seconds: float | None = None  # curl_sha256: the openssl dgst part of its seconds
    post_seconds: float | None = None  # modelhost: the POST /models/download alone


# --- the served file ----------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in chunks (also warms the page cache nginx serves from)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def ensure_data_file(path: Path, size: int) -> bool:
    """Write ``size`` random bytes to ``path`` unless a file of that size is there already.

    Returns True when the file was (re)generated.
    """
    if path.is_file() and path.stat().st_size == size:
        return False
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        remaining = size
        while remaining:
            n = min(CHUNK, remaining)
            f.write(os.urandom(n))
            remaining -= n
    tmp.replace(path)
    return True


# --- nginx --------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nginx_conf(runtime: Path, root: Path, port: int, limit_rate: int | None = None) -> str:
    """A minimal single-worker static-file nginx config, every path inside ``runtime``.

    ``limit_rate`` caps each response at that many bytes per second (a remote host's speed).
    """
    user = ""
    if os.geteuid() == 0:
        # As root nginx would run its worker as "nobody", which cannot read a 0700 work dir.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n"
    temp_paths = "".join(
        f"    {kind}_temp_path {runtime / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}"
        "worker_processes 1;\n"
        "daemon off;\n"
        f"pid {runtime / 'nginx.pid'};\n"
        f"error_log {runtime / 'error.log'} warn;\n"
        "events { worker_connections 64; }\n"
        "http {\n"
        "    access_log off;\n"
        "    sendfile on;\n"
        "    tcp_nopush on;\n"
        "    default_type application/octet-stream;\n"
        f"    limit_rate {limit_rate or 0};\n"
        f"{temp_paths}"
        "    server {\n"
        f"        listen 127.0.0.1:{port};\n"
        f"        root {root};\n"
        "    }\n"
        "}\n"
    )


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 10.0) -> None:
    """Block until ``proc`` accepts connections on ``port``; raise if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"nginx exited with status {proc.returncode} at start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nginx did not listen on 127.0.0.1:{port} within {timeout_s:.0f}s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (nginx's fast shutdown), then SIGKILL if it lingers; reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def nginx_serving(root: Path, runtime: Path, limit_rate: int | None = None) -> Iterator[int]:
    """Run nginx serving ``root`` on a free loopback port; yield the port; always stop it."""
    if not os.access(NGINX, os.X_OK):
        raise BenchError(f"{NGINX} not found: apt-get install nginx-light")
    runtime.mkdir(parents=True, exist_ok=True)
    error_log = runtime / "error.log"
    for _ in range(3):  # the free port can be taken between the probe and nginx's bind
        port = free_port()
        conf = runtime / "nginx.conf"
        conf.write_text(nginx_conf(runtime, root, port, limit_rate))
        proc = subprocess.Popen(
            [NGINX, "-p", str(runtime), "-c", str(conf), "-e", str(error_log)],
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only us; the finally below stops nginx
        )
        try:
            try:
                wait_listening(proc, port)
            except BenchError as exc:
                log = error_log.read_text(errors="replace") if error_log.exists() else ""
                if "Address already in use" in log:
                    continue
                raise BenchError(f"{exc}\n{log.strip()}") from None
            yield port
            return
        finally:
            stop_process(proc)
    raise BenchError("nginx could not bind a free port after 3 tries")


# --- timed runs ---------------------------------------------------------------------------


def throughput(size: int, seconds: float) -> float:
    """MiB per second."""
    return size / MIB / seconds


def run_curl(url: str, out: Path, size: int, with_sync: bool) -> tuple[float, float | None]:
    """Download with curl; return wall seconds, and seconds including ``sync -d`` if asked."""
    cmd = ["curl", "-q", "-s", "-S", "-f", "-o", str(out), url]
    start = time.perf_counter()
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    synced = None
    if result.returncode == 0 and with_sync:
        sync = subprocess.run(["sync", "-d", str(out)], capture_output=True, text=True)
        synced = time.perf_counter() - start
        if sync.returncode != 0:
            raise BenchError(f"sync -d {out} failed: {sync.stderr.strip()}")
    if result.returncode != 0:
        raise BenchError(f"curl failed ({result.returncode}): {result.stderr.strip()}")
    got = out.stat().st_size
    if got != size:
        raise BenchError(f"curl wrote {got} bytes, expected {size}")
    return seconds, synced


def openssl_sha256(path: Path) -> str:
    """``openssl dgst -sha256 FILE``'s digest (OpenSSL uses the CPU's SHA instructions;
    coreutils' sha256sum may not)."""
    result = subprocess.run(
        ["openssl", "dgst", "-sha256", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise BenchError(f"openssl dgst failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().rsplit(" ", 1)[-1].lower()


def run_curl_sha256(url: str, out: Path, size: int, sha256: str) -> tuple[float, float]:
    """``curl -o`` then ``openssl dgst -sha256``; return total and hashing seconds."""
    start = time.perf_counter()
    run_curl(url, out, size, with_sync=False)
    hashing = time.perf_counter()
    digest = openssl_sha256(out)
    end = time.perf_counter()
    if digest != sha256:
        raise BenchError(f"openssl dgst says {digest}, expected {sha256}")
    return end - start, end - hashing


def run_aria2c(url: str, out: Path, size: int, sha256: str) -> float:
    """Download with ``aria2c -x16 -s16 -k1M`` (16 connections, 1 MiB pieces); wall seconds.

    Its output is checked afterwards, untimed (aria2c verifies nothing by itself here).
    """
    cmd = [*ARIA2C, "-d", str(out.parent), "-o", out.name, url]
    start = time.perf_counter()
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise BenchError(f"aria2c failed ({result.returncode}): {result.stdout}{result.stderr}")
    if out.stat().st_size != size or sha256_of(out) != sha256:
        raise BenchError("aria2c's output does not have the served file's size and sha256")
    return seconds


def run_engine(url: str, partial_dir: Path, size: int, sha256: str) -> tuple[float, float]:
    """Fetch with the engine in a fresh Python process; return wall and in-process seconds."""
    cmd = [sys.executable, __file__, WORKER_FLAG, url, str(partial_dir), str(size), sha256]
    start = time.perf_counter()
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise BenchError(f"engine worker failed ({result.returncode}):\n{result.stderr.strip()}")
    report = json.loads(result.stdout)
    if report["sha256"] != sha256:
        raise BenchError(f"engine returned sha256 {report['sha256']}, expected {sha256}")
    if report["size"] != size or Path(report["local_path"]).stat().st_size != size:
        raise BenchError(f"engine returned {report['size']} bytes, expected {size}")
    return seconds, float(report["fetch_seconds"])


def engine_worker(url: str, partial_dir: str, size: str, sha256: str) -> int:
    """The engine side of one run, in its own process: fetch, then report as JSON on stdout."""
    from modelhost.fetch import FetchEngine, FileSpec, UrlPolicy

    host = url.split("/")[2]
    engine = FetchEngine(Path(partial_dir), policy=UrlPolicy.from_hosts([host]))
    spec = FileSpec(url=url, path=SERVED_NAME, size=int(size), sha256=sha256)
    engine.discard(spec)
    start = time.perf_counter()
    fetched = engine.fetch(spec)
    elapsed = time.perf_counter() - start
    report = {
        "sha256": fetched.sha256,
        "size": fetched.size,
        "local_path": str(fetched.local_path),
        "bytes_transferred": fetched.bytes_transferred,
        "fetch_seconds": elapsed,
    }
    print(json.dumps(report))
    return 0


def discard_engine_output(partial_dir: Path, url: str, sha256: str) -> None:
    """Delete what the engine left for ``url`` (its .part and .json), through its own API."""
    from modelhost.fetch import FetchEngine, FileSpec, UrlPolicy

    host = url.split("/")[2]
    engine = FetchEngine(partial_dir, policy=UrlPolicy.from_hosts([host]))
    engine.discard(FileSpec(url=url, path=SERVED_NAME, sha256=sha256))


# --- modelhost through its API ------------------------------------------------------------


@contextmanager
def modelhost_serving(home: Path, nginx_port: int) -> Iterator[str]:
    """A ``python -m modelhost serve`` subprocess with a fresh ``home`` that may fetch from the
    loopback nginx only; yield its base URL once ``/health`` answers; always stop it.

    ``MODELHOST_FETCH_*`` settings in the environment (connections, caps) pass through.
    """
    import httpx

    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "MODELHOST_HOME": str(home),
        "MODELHOST_URL_ALLOW": f"127.0.0.1:{nginx_port}",
        "MODELHOST_URL_ALLOW_DEFAULTS": "false",
    }
    log_path = home.parent / "modelhost.log"
    with log_path.open("wb") as log:
        cmd = [sys.executable, "-m", "modelhost", "serve", "--port", str(port)]
        proc = subprocess.Popen(
            [*cmd, "--log-level", "warning"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    text = log_path.read_text(errors="replace")
                    raise BenchError(f"modelhost exited with status {proc.returncode}:\n{text}")
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"modelhost did not answer /health in {SERVER_START_TIMEOUT_S}s"
                    )
                time.sleep(0.05)
            yield base
        finally:
            stop_process(proc)


def run_modelhost(base: str, url: str, size: int, sha256: str) -> tuple[float, float]:
    """One download through the API (url source, sha256 given): timed from ``POST
    /models/download`` to the job's status ``completed`` (polled every ``POLL_S``). The
    manifest and the installed file are checked afterwards (untimed), then the model is
    deleted. Returns the seconds and the POST's own seconds."""
    import httpx

    body = {
        "source": "url",
        "model_id": url,
        "name": API_MODEL,
        "filename": API_FILE,  # not .bin: that suffix means pickled weights, to convert
        "sha256": sha256,
        "load": False,
    }
    with httpx.Client(base_url=base, timeout=120) as client:
        start = time.perf_counter()
        response = client.post("/models/download", json=body)
        posted = time.perf_counter() - start
        if response.status_code != 202:
            raise BenchError(f"POST /models/download: {response.status_code} {response.text}")
        download_id = response.json()["download_id"]
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            status = client.get(f"/models/download/status/{download_id}").json()
            if status["status"] == "completed":
                break
            if status["status"] in ("failed", "cancelled") or time.monotonic() > deadline:
                raise BenchError(f"modelhost job {status['status']}: {status['message']}")
            time.sleep(POLL_S)
        seconds = time.perf_counter() - start
        info = client.get(f"/models/download/{API_MODEL}/info").json()
        files = {f["path"]: (f["size"], f["sha256"]) for f in info["files"]}
        if files != {API_FILE: (size, sha256)}:
            raise BenchError(f"modelhost's manifest lists {files}, expected {API_FILE}")
        installed = Path(info["path"]) / API_FILE
        if installed.stat().st_size != size or sha256_of(installed) != sha256:
            raise BenchError(f"{installed} does not have the served file's size and sha256")
        deleted = client.delete(f"/models/download/{API_MODEL}")
        if deleted.status_code != 200:
            raise BenchError(f"DELETE /models/download/{API_MODEL}: {deleted.status_code}")
    return seconds, posted


# --- the benchmark ------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything a round needs."""

    url: str
    size: int
    sha256: str
    workdir: Path
    curl_fsync: bool
    settle_s: float
    api_base: str | None = None

    @property
    def curl_out(self) -> Path:
        return self.workdir / "curl.out"

    @property
    def partial_dir(self) -> Path:
        return self.workdir / "engine-partial"


def clean(setup: Setup) -> None:
    """Delete every tool's output."""
    setup.curl_out.unlink(missing_ok=True)
    for leftover in setup.workdir.glob("curl.out.aria2"):
        leftover.unlink()
    discard_engine_output(setup.partial_dir, setup.url, setup.sha256)


def timed(setup: Setup, tool: str, round_no: int) -> Run:
    """Run ``tool`` once; its Run."""
    size = setup.size
    if tool == "curl":
        seconds, synced = run_curl(setup.url, setup.curl_out, size, setup.curl_fsync)
        return Run(round_no, tool, seconds, throughput(size, seconds), seconds_with_sync=synced)
    if tool == "engine":
        seconds, inprocess = run_engine(setup.url, setup.partial_dir, size, setup.sha256)
        return Run(round_no, tool, seconds, throughput(size, seconds), inprocess_seconds=inprocess)
    if tool == "curl_sha256":
        seconds, hashing = run_curl_sha256(setup.url, setup.curl_out, size, setup.sha256)
        return Run(round_no, tool, seconds, throughput(size, seconds), hash_seconds=hashing)
    if tool == "aria2c":
        seconds = run_aria2c(setup.url, setup.curl_out, size, setup.sha256)
        return Run(round_no, tool, seconds, throughput(size, seconds))
    if tool == "modelhost" and setup.api_base is not None:
        seconds, posted = run_modelhost(setup.api_base, setup.url, size, setup.sha256)
        return Run(round_no, tool, seconds, throughput(size, seconds), post_seconds=posted)
    raise BenchError(f"unknown tool {tool!r}")


def one_run(setup: Setup, tool: str, round_no: int) -> Run:
    """Time one download by ``tool`` from a clean state, then delete its output."""
    clean(setup)
    os.sync()  # start every run with no dirty pages of earlier runs being written back
    time.sleep(setup.settle_s)  # the same memory state for every tool (see --settle-s)
    try:
        return timed(setup, tool, round_no)
    finally:
        clean(setup)


def describe(run: Run, size: int) -> str:
    """One human-readable line for a run."""
    line = f"round {run.round}  {run.tool:<11} {run.seconds:8.3f} s  {run.mib_per_s:9.1f} MiB/s"
    if run.inprocess_seconds is not None:
        line += (
            f"   (in-process fetch {run.inprocess_seconds:.3f} s, "
            f"{throughput(size, run.inprocess_seconds):.1f} MiB/s)"
        )
    if run.seconds_with_sync is not None:
        line += (
            f"   (with sync -d {run.seconds_with_sync:.3f} s, "
            f"{throughput(size, run.seconds_with_sync):.1f} MiB/s)"
        )
    if run.hash_seconds is not None:
        line += f"   (of which openssl dgst {run.hash_seconds:.3f} s)"
    if run.post_seconds is not None:
        line += f"   (POST answered in {run.post_seconds:.3f} s)"
    return line


@dataclass(frozen=True)
class Comparison:
    """A tool against its peer: the median over rounds of per-round time ratios, the tool's
    seconds / the peer's for the same file (below 1: the tool is faster)."""

    tool: str
    peer: str
    target: str  # e.g. "<= 1.05"

    def ratio(self, tool: Run, peer: Run) -> float:
        return tool.seconds / peer.seconds

    def met(self, ratio: float) -> bool:
        bound = float(self.target.split()[1])
        return ratio <= bound if self.target.startswith("<=") else ratio >= bound


def comparisons(tools: tuple[str, ...]) -> list[Comparison]:
    """The comparisons a run of ``tools`` reports, each with the brief's target."""
    if "aria2c" in tools:  # capped: modelhost's API against multi- and single-connection
        return [
            Comparison("modelhost", "aria2c", "<= 1.0"),
            Comparison("modelhost", "curl", "<= 1.0"),
        ]
    wanted = [
        # The brief's target was the engine's throughput >= 0.9 x curl's. Every ratio here is a
        # time (docs/performance.md's convention), and for the same bytes time = 1 / throughput,
        # so the same target is engine/curl time <= 1 / 0.9 = 1.111..., written to 2 decimals.
        Comparison("engine", "curl", "<= 1.11"),
        Comparison("modelhost", "curl_sha256", "<= 1.05"),
    ]
    return [c for c in wanted if c.tool in tools and c.peer in tools]


def summarize_comparison(c: Comparison, runs: list[Run], rounds: int) -> dict[str, object]:
    """One comparison's figures: per-round and median ratio, the peer's own speed."""
    tool = {r.round: r for r in runs if r.tool == c.tool}
    peer = {r.round: r for r in runs if r.tool == c.peer}
    ratios = [c.ratio(tool[i], peer[i]) for i in range(rounds)]
    ratio = statistics.median(ratios)
    return {
        "tool": c.tool,
        "peer": c.peer,
        "measure": "time",
        "round_ratios": ratios,
        "ratio": ratio,
        "target": c.target,
        "met": c.met(ratio),
        "peer_mib_per_s": statistics.median(r.mib_per_s for r in peer.values()),
        "tool_mib_per_s": statistics.median(r.mib_per_s for r in tool.values()),
    }


def summarize(
    runs: list[Run], size: int, rounds: int, curl_fsync: bool, tools: tuple[str, ...]
) -> dict[str, object]:
    """Medians per tool, the median of per-round engine/curl time ratios, each comparison."""
    summary: dict[str, object] = {"size_bytes": size, "rounds": rounds, "tools": list(tools)}
    for name in tools:
        summary[f"{name}_mib_per_s"] = statistics.median(
            r.mib_per_s for r in runs if r.tool == name
        )
    engine = {r.round: r for r in runs if r.tool == "engine"}
    curl = {r.round: r for r in runs if r.tool == "curl"}
    if engine and curl:
        ratios = [engine[i].seconds / curl[i].seconds for i in range(rounds)]
        summary.update(
            engine_mode=ENGINE_MODE,
            engine_inprocess_mib_per_s=statistics.median(
                throughput(size, r.inprocess_seconds or 0.0) for r in engine.values()
            ),
            round_time_ratios=ratios,
            time_ratio=statistics.median(ratios),
        )
    summary["comparisons"] = [summarize_comparison(c, runs, rounds) for c in comparisons(tools)]
    summary["curl_fsync"] = curl_fsync
    if curl_fsync and curl:
        synced = [throughput(size, curl[i].seconds_with_sync or 0.0) for i in range(rounds)]
        summary["curl_sync_mib_per_s"] = statistics.median(synced)
        if engine:
            sync_ratios = [
                engine[i].seconds / (curl[i].seconds_with_sync or 0.0) for i in range(rounds)
            ]
            summary["round_time_ratios_vs_curl_sync"] = sync_ratios
            summary["time_ratio_vs_curl_sync"] = statistics.median(sync_ratios)
    summary["runs"] = [asdict(r) for r in runs]
    return summary


FAIRNESS_NOTE = (
    "note: the engine hashes (sha256) and fsyncs the file and runs as a fresh Python process "
    "(start-up and imports included); curl does neither verification nor fsync; modelhost "
    "(through the API, server already running) verifies, fsyncs and commits the file into its "
    "store; curl_sha256 is curl -o, then openssl dgst -sha256; aria2c verifies nothing"
)


def print_summary(summary: dict[str, object]) -> None:
    """The human-readable summary lines."""
    rounds = summary["rounds"]
    for name in summary["tools"]:  # type: ignore[attr-defined]
        line = f"{name:<11} median: {summary[f'{name}_mib_per_s']:.1f} MiB/s"
        if name == "engine":
            line += f" (in-process fetch only: {summary['engine_inprocess_mib_per_s']:.1f} MiB/s)"
        print(line)
    if summary["curl_fsync"]:
        print(f"curl + sync -d median: {summary['curl_sync_mib_per_s']:.1f} MiB/s")
    print(FAIRNESS_NOTE)
    print("every ratio is a time ratio, tool's seconds / reference's (below 1: tool faster)")
    compared = {(c["tool"], c["peer"]) for c in summary["comparisons"]}  # type: ignore[attr-defined]
    if "time_ratio" in summary and ("engine", "curl") not in compared:  # else printed below
        print(f"time engine/curl (median of {rounds} rounds): {summary['time_ratio']:.2f}")
    if "time_ratio_vs_curl_sync" in summary:
        print(
            f"time engine/(curl + sync -d) (median of {rounds} rounds): "
            f"{summary['time_ratio_vs_curl_sync']:.2f}"
        )
    for c in summary["comparisons"]:  # type: ignore[attr-defined]
        print(
            f"time {c['tool']}/{c['peer']} (median of {rounds} rounds): {c['ratio']:.2f} "
            f"(target {c['target']}: {'met' if c['met'] else 'NOT met'}; "
            f"{c['peer']} {c['peer_mib_per_s']:.1f} MiB/s, {c['tool']} {c['tool_mib_per_s']:.1f})"
        )


def tools_for(args: argparse.Namespace) -> tuple[str, ...]:
    """Which tools this invocation runs, in round 0's order (odd rounds reverse it)."""
    if args.cap_mbps is not None:
        return ("curl", "aria2c", "modelhost")
    if args.api:
        return ("curl", "engine", "curl_sha256", "modelhost")
    return ("curl", "engine")


def check_tools(tools: tuple[str, ...]) -> None:
    """Refuse to start without nginx or a reference tool."""
    if not os.access(NGINX, os.X_OK):
        raise BenchError(f"{NGINX} not found: apt-get install nginx-light")
    needed = {"curl": "curl", "curl_sha256": "openssl", "aria2c": "aria2c"}
    for tool in tools:
        if tool in needed and shutil.which(needed[tool]) is None:
            raise BenchError(f"{needed[tool]} not found: apt-get install {needed[tool]}")


def run_rounds(setup: Setup, tools: tuple[str, ...], rounds: int, say) -> list[Run]:
    """Every tool once per round, alternating the order; returns the runs."""
    runs: list[Run] = []
    for round_no in range(rounds):
        for tool in tools if round_no % 2 == 0 else tools[::-1]:
            run = one_run(setup, tool, round_no)
            runs.append(run)
            say(describe(run, setup.size))
    return runs


def benchmark(args: argparse.Namespace) -> dict[str, object]:
    """Set up the file and nginx, run the alternating rounds, return the summary."""
    tools = tools_for(args)
    check_tools(tools)
    size = args.size_mb * MIB
    workdir = Path(args.workdir)
    served = workdir / "served"
    served.mkdir(parents=True, exist_ok=True)
    data = served / SERVED_NAME
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else print
    if ensure_data_file(data, size):
        say(f"generated {data} ({args.size_mb} MiB of random bytes)")
    else:
        say(f"reusing {data} ({args.size_mb} MiB)")
    sha256 = sha256_of(data)
    limit = None if args.cap_mbps is None else int(args.cap_mbps * MB)
    runtime = Path(tempfile.mkdtemp(prefix="nginx-", dir=workdir))
    home = workdir / "modelhost" / "home"
    try:
        with nginx_serving(served, runtime, limit) as port, ExitStack() as stack:
            setup = Setup(
                url=f"http://127.0.0.1:{port}/{SERVED_NAME}",
                size=size,
                sha256=sha256,
                workdir=workdir,
                curl_fsync=args.curl_fsync,
                settle_s=args.settle_s,
            )
            if "modelhost" in tools:
                shutil.rmtree(home.parent, ignore_errors=True)
                setup.api_base = stack.enter_context(modelhost_serving(home, port))
            cap = "uncapped" if limit is None else f"nginx limit_rate {limit} B/s per connection"
            say(
                f"serving {setup.url} with nginx ({cap}); tools {', '.join(tools)}; engine as a "
                f"{ENGINE_MODE}; {args.rounds} rounds, alternating order, {args.settle_s:g} s "
                "pause before each run"
            )
            runs = run_rounds(setup, tools, args.rounds, say)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(home.parent, ignore_errors=True)
    summary = summarize(runs, size, args.rounds, args.curl_fsync, tools)
    summary["settle_s"] = args.settle_s
    summary["cap_bytes_per_s"] = limit
    return summary


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Fetch-engine (and modelhost API) download time against curl, openssl and "
        "aria2c, on one file served by nginx on loopback (time ratios, below 1: faster)."
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--size-mb", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument(
        "--workdir",
        default=str(Path(tempfile.gettempdir()) / "modelhost-bench-fetch"),
        help="where the served file (kept for reuse) and the downloads go (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.add_argument(
        "--curl-fsync", action="store_true", help="also time `sync -d` of curl's output"
    )
    parser.add_argument(
        "--api",
        action="store_true",
        help="also download through a modelhost server's API, against curl -o + openssl dgst",
    )
    parser.add_argument(
        "--cap-mbps",
        type=float,
        default=None,
        help="cap every connection at this many MB/s (10^6 bytes; nginx limit_rate) and "
        "compare modelhost's API with aria2c -x16 -s16 -k1M and curl",
    )
    parser.add_argument(
        "--settle-s",
        type=float,
        default=SETTLE_S,
        help="pause before each run, after deleting the last output (default %(default)s; "
        "see SETTLE_S in this script)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.size_mb < 1 or args.settle_s < 0:
        parser.error("--rounds and --size-mb must be at least 1, --settle-s not negative")
    if args.cap_mbps is not None and args.cap_mbps * MB < 1:
        parser.error("--cap-mbps must be at least 0.000001 (one byte per second)")
    return args


def raise_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the benchmark, print the results, return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER_FLAG]:
        return engine_worker(*argv[1:])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_on_sigterm)  # so nginx is stopped on kill too
    try:
        summary = benchmark(args)
    except BenchError as exc:
        print(f"bench/fetch.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/fetch.py: interrupted", file=sys.stderr)
        return 130
    if args.json:
        summary["note"] = FAIRNESS_NOTE
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
