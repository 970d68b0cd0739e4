"""Fetch-engine throughput relative to curl, both downloading one file from nginx on loopback.

Run it from the repository root, with the package installed::

    python bench/fetch.py                      # 1 GiB file, 5 rounds
    python bench/fetch.py --size-mb 256 --rounds 9 --curl-fsync --json

What it measures: a local nginx (``/usr/sbin/nginx``; ``apt-get install nginx-light``) serves
``--size-mb`` MiB of random bytes from ``--workdir``. Each round downloads that file once with
``curl -s -o FILE URL`` and once with ``FetchEngine.fetch`` (given the file's expected sha256,
so the engine verifies it as it always does), alternating which goes first. Both run as fresh
processes timed by wall clock around ``subprocess.run``, so both pay process start-up (Python
and ``import modelhost.fetch`` for the engine). The engine worker also reports the time of the
``fetch`` call alone, shown as ``in-process``.

It prints every run, the median MiB/s of each tool and the median of the per-round ratios
engine/curl (above 1: the engine is faster). The engine fsyncs the file and hashes it; curl
does neither. ``--curl-fsync`` also times ``sync -d FILE`` after curl and reports a second
ratio against curl + fsync. Before every run (untimed) the previous output is deleted, dirty
pages are flushed with ``sync`` and the bench waits ``--settle-s`` seconds, so that each run
starts from the same memory state (see ``SETTLE_S``). The served file is kept in the work
directory and reused by the next run with the same size.

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
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

NGINX = "/usr/sbin/nginx"
MIB = 1024 * 1024
CHUNK = 4 * MIB
SERVED_NAME = "big.bin"
WORKER_FLAG = "--engine-worker"
ENGINE_MODE = "subprocess"
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


# --- the benchmark ------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything a round needs."""

    url: str
    size: int
    sha256: str
    curl_out: Path
    partial_dir: Path
    curl_fsync: bool
    settle_s: float


def one_run(setup: Setup, tool: str, round_no: int) -> Run:
    """Time one download by ``tool`` from a clean state, then delete its output."""
    setup.curl_out.unlink(missing_ok=True)
    discard_engine_output(setup.partial_dir, setup.url, setup.sha256)
    os.sync()  # start every run with no dirty pages of earlier runs being written back
    time.sleep(setup.settle_s)  # the same memory state for both tools (see --settle-s)
    try:
        if tool == "curl":
            seconds, synced = run_curl(setup.url, setup.curl_out, setup.size, setup.curl_fsync)
            return Run(
                round_no, tool, seconds, throughput(setup.size, seconds), seconds_with_sync=synced
            )
        seconds, inprocess = run_engine(setup.url, setup.partial_dir, setup.size, setup.sha256)
        return Run(
            round_no, tool, seconds, throughput(setup.size, seconds), inprocess_seconds=inprocess
        )
    finally:
        setup.curl_out.unlink(missing_ok=True)
        discard_engine_output(setup.partial_dir, setup.url, setup.sha256)


def describe(run: Run, size: int) -> str:
    """One human-readable line for a run."""
    line = f"round {run.round}  {run.tool:<6} {run.seconds:8.3f} s  {run.mib_per_s:9.1f} MiB/s"
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
    return line


def summarize(runs: list[Run], size: int, rounds: int, curl_fsync: bool) -> dict[str, object]:
    """Medians per tool and the median of per-round engine/curl ratios."""
    engine = {r.round: r for r in runs if r.tool == "engine"}
    curl = {r.round: r for r in runs if r.tool == "curl"}
    ratios = [engine[i].mib_per_s / curl[i].mib_per_s for i in range(rounds)]
    summary: dict[str, object] = {
        "size_bytes": size,
        "rounds": rounds,
        "engine_mode": ENGINE_MODE,
        "engine_mib_per_s": statistics.median(r.mib_per_s for r in engine.values()),
        "curl_mib_per_s": statistics.median(r.mib_per_s for r in curl.values()),
        "engine_inprocess_mib_per_s": statistics.median(
            throughput(size, r.inprocess_seconds or 0.0) for r in engine.values()
        ),
        "round_ratios": ratios,
        "ratio": statistics.median(ratios),
        "curl_fsync": curl_fsync,
        "runs": [asdict(r) for r in runs],
    }
    if curl_fsync:
        synced = [throughput(size, curl[i].seconds_with_sync or 0.0) for i in range(rounds)]
        sync_ratios = [engine[i].mib_per_s / synced[i] for i in range(rounds)]
        summary["curl_sync_mib_per_s"] = statistics.median(synced)
        summary["round_ratios_vs_curl_sync"] = sync_ratios
        summary["ratio_vs_curl_sync"] = statistics.median(sync_ratios)
    return summary


FAIRNESS_NOTE = (
    "note: the engine hashes (sha256) and fsyncs the file and runs as a fresh Python process "
    "(start-up and imports included); curl does neither verification nor fsync"
)


def print_summary(summary: dict[str, object]) -> None:
    """The human-readable summary lines."""
    rounds = summary["rounds"]
    print(
        f"engine median: {summary['engine_mib_per_s']:.1f} MiB/s "
        f"(in-process fetch only: {summary['engine_inprocess_mib_per_s']:.1f} MiB/s)"
    )
    print(f"curl   median: {summary['curl_mib_per_s']:.1f} MiB/s")
    if summary["curl_fsync"]:
        print(f"curl + sync -d median: {summary['curl_sync_mib_per_s']:.1f} MiB/s")
    print(FAIRNESS_NOTE)
    print(f"ratio engine/curl (median of {rounds} rounds): {summary['ratio']:.2f}")
    if summary["curl_fsync"]:
        print(
            f"ratio engine/(curl + sync -d) (median of {rounds} rounds): "
            f"{summary['ratio_vs_curl_sync']:.2f}"
        )


def benchmark(args: argparse.Namespace) -> dict[str, object]:
    """Set up the file and nginx, run the alternating rounds, return the summary."""
    if not os.access(NGINX, os.X_OK):
        raise BenchError(f"{NGINX} not found: apt-get install nginx-light")
    if shutil.which("curl") is None:
        raise BenchError("curl not found: apt-get install curl")
    size = args.size_mb * MIB
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    served = workdir / "served"
    served.mkdir(exist_ok=True)
    data = served / SERVED_NAME
    say = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    if ensure_data_file(data, size):
        say(f"generated {data} ({args.size_mb} MiB of random bytes)")
    else:
        say(f"reusing {data} ({args.size_mb} MiB)")
    sha256 = sha256_of(data)
    runtime = Path(tempfile.mkdtemp(prefix="nginx-", dir=workdir))
    try:
        with nginx_serving(served, runtime) as port:
            setup = Setup(
                url=f"http://127.0.0.1:{port}/{SERVED_NAME}",
                size=size,
                sha256=sha256,
                curl_out=workdir / "curl.out",
                partial_dir=workdir / "engine-partial",
                curl_fsync=args.curl_fsync,
                settle_s=args.settle_s,
            )
            say(
                f"serving {setup.url} with nginx; engine runs as a {ENGINE_MODE} "
                f"({Path(sys.executable).name}); {args.rounds} rounds, alternating order, "
                f"{args.settle_s:g} s pause before each run"
            )
            runs: list[Run] = []
            for round_no in range(args.rounds):
                order = ("curl", "engine") if round_no % 2 == 0 else ("engine", "curl")
                for tool in order:
                    run = one_run(setup, tool, round_no)
                    runs.append(run)
                    say(describe(run, size))
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    summary = summarize(runs, size, args.rounds, args.curl_fsync)
    summary["settle_s"] = args.settle_s
    return summary


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Fetch-engine throughput divided by curl's, on one file served by nginx."
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
        "--settle-s",
        type=float,
        default=SETTLE_S,
        help="pause before each run, after deleting the last output (default %(default)s; "
        "see SETTLE_S in this script)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.size_mb < 1 or args.settle_s < 0:
        parser.error("--rounds and --size-mb must be at least 1, --settle-s not negative")
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
