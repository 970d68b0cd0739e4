"""modelhost's Hugging Face downloads relative to ``huggingface_hub.snapshot_download``.

Run it from the repository root, with the package installed::

    python bench/hub_fetch.py              # 16 x 64 MiB shards + 5 small files, 3 rounds
    python bench/hub_fetch.py --size-mb 256 --files 8 --parallel-files 8 --json

What it measures: one multi-file model repository (``--files`` random-byte weight shards named
``model-000NN-of-000MM.safetensors``, ``--size-mb`` MiB in all, plus ``config.json``,
``generation_config.json``, ``model.safetensors.index.json``, ``tokenizer.json`` and
``tokenizer_config.json``) is served by the Hub-compatible loopback test server
``tests/hubserver.py``. Its ``resolve`` answers for LFS files redirect (302) to a private nginx
on loopback serving the exported blobs, as the real Hub redirects to its CDN, so the Python
test server only answers metadata and the small files. Each round downloads the repository
once with each tool, alternating which goes first:

* modelhost: a real server (``python -m modelhost serve``) with a fresh ``MODELHOST_HOME``,
  ``HF_ENDPOINT`` set to the test Hub, the nginx host in ``MODELHOST_URL_ALLOW``, an empty
  ``HF_HUB_CACHE`` (nothing to import) and ``MODELHOST_FETCH_PARALLEL_FILES`` from
  ``--parallel-files``. The server is started, and answers ``/health``, *before* the timer;
  the time runs from ``POST /models/download`` to the job's status ``completed`` (polled every
  ``POLL_S``). modelhost hashes (sha256) and fsyncs every file before it commits the model.
* snapshot_download: ``snapshot_download(REPO, cache_dir=<fresh dir>)`` in a fresh Python
  process (``HF_HUB_DISABLE_XET=1``, its default ``max_workers``, 8). The figure is the call
  alone, timed inside that process (imports excluded); the process's wall time is shown too.
  It checks sizes only, and does not fsync.

Both throughputs are total bytes / seconds. The summary is the median of the per-round time
ratios modelhost / snapshot_download, modelhost's seconds / snapshot_download's for the same
repository (below 1: modelhost is faster; the convention of docs/performance.md). After
every run (untimed) each installed file's sha256 is checked against the generated file's, and
the bench checks that no LFS byte came from the Python server; any mismatch aborts. Before
every run the previous output is deleted, ``sync`` runs and the bench pauses ``--settle-s``
seconds (see ``SETTLE_S`` in ``bench/fetch.py``). The generated files and exported blobs stay
in ``--workdir`` and are reused by the next run with the same ``--size-mb`` and ``--files``.

Exit status: 0 when every run succeeded and verified, 1 otherwise (2 for bad usage).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fetch import (
    NGINX,
    SETTLE_S,
    BenchError,
    ensure_data_file,
    free_port,
    nginx_serving,
    raise_on_sigterm,
    sha256_of,
    stop_process,
)

if TYPE_CHECKING:
    import httpx
    from hubserver import HubServer

MIB = 1024 * 1024
REPO = "bench-org/sharded-model"
MODEL_NAME = "bench"
TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
HF_WORKER_FLAG = "--hf-worker"
POLL_S = 0.025  # status polling interval of the modelhost run
SERVER_START_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 900.0
HF_ENV = {
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "NO_PROXY": "127.0.0.1,localhost",
}
NOTE = (
    "modelhost: server started (and /health answered) before the timer; timed from POST "
    "/models/download to status completed; it hashes (sha256) and fsyncs every file. "
    "snapshot_download: the call alone, timed inside a fresh Python process (imports "
    "excluded), default max_workers; it checks sizes only and does not fsync"
)


@dataclass
class Run:
    """One timed download of the whole repository."""

    round: int
    tool: str  # "modelhost" or "snapshot_download"
    seconds: float  # the figure throughput is computed from
    mib_per_s: float
    wall_seconds: float | None = None  # snapshot_download: the whole subprocess
    post_seconds: float | None = None  # modelhost: POST /models/download (planning included)
    hub_requests: dict[str, int] = field(default_factory=dict)  # to the Python test Hub


@dataclass(frozen=True)
class RepoFiles:
    """The repository as served: repo path -> what each file must hash to, and total size."""

    sha256: dict[str, str]
    total_bytes: int
    lfs_paths: frozenset[str]  # the Python Hub must not serve these: nginx does


@dataclass
class Setup:
    """Everything a run needs."""

    hub: HubServer
    repo: RepoFiles
    rundir: Path
    settle_s: float
    parallel_files: int
    nginx_port: int


# --- the repository -----------------------------------------------------------------------


def shard_sizes(total: int, count: int) -> list[int]:
    """``count`` sizes summing to ``total``, as equal as possible."""
    base, extra = divmod(total, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def small_files(shards: list[str]) -> dict[str, bytes]:
    """The non-weight files of a sharded transformers checkpoint (deterministic content)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "num_hidden_layers": len(shards),
        "torch_dtype": "bfloat16",
    }
    index = {
        "metadata": {"total_size": 0},
        "weight_map": {f"model.layers.{i}.weight": name for i, name in enumerate(shards)},
    }
    vocab = {f"tok{i}": i for i in range(8000)}  # ~100 KB, below the Hub's LFS threshold
    tokenizer = {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab}}
    return {
        "config.json": json.dumps(config, indent=2).encode(),
        "generation_config.json": json.dumps({"do_sample": False, "max_length": 64}).encode(),
        "model.safetensors.index.json": json.dumps(index, indent=2).encode(),
        "tokenizer.json": json.dumps(tokenizer).encode(),
        "tokenizer_config.json": json.dumps({"model_max_length": 2048}).encode(),
    }


def build_repo(
    directory: Path, size: int, shards: int, say: Callable[[str], None]
) -> dict[str, Path]:
    """Write (or reuse) the repository's files in ``directory``; remove anything else there."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    files: dict[str, Path] = {}
    generated = 0
    for name, nbytes in zip(names, shard_sizes(size, shards), strict=True):
        files[name] = directory / name
        generated += ensure_data_file(files[name], nbytes)
    for name, data in small_files(names).items():
        files[name] = directory / name
        if not files[name].is_file() or files[name].read_bytes() != data:
            files[name].write_bytes(data)
    for stale in directory.iterdir():
        if stale not in files.values():
            stale.unlink()
    say(
        f"{'generated' if generated else 'reusing'} {directory}: {len(files)} files, "
        f"{shards} shards of ~{size / shards / MIB:.1f} MiB"
    )
    return files


def served_repo(hub: HubServer) -> RepoFiles:
    """What the Hub serves for ``REPO``: digests and sizes, as the clients must install them."""
    files = hub.files(REPO)
    return RepoFiles(
        sha256={path: f.sha256 for path, f in files.items()},
        total_bytes=sum(f.size for f in files.values()),
        lfs_paths=frozenset(path for path, f in files.items() if f.lfs),
    )


def export_cdn(hub: HubServer, cdn: Path) -> None:
    """Make ``cdn`` hold exactly the repo's LFS blobs as ``<sha256>``, verified (and cached)."""
    lfs = {f.sha256: f.size for f in hub.files(REPO).values() if f.lfs}
    cdn.mkdir(parents=True, exist_ok=True)
    for stale in cdn.iterdir():
        if stale.name not in lfs:
            stale.unlink()
    present = all(
        (cdn / sha).is_file() and (cdn / sha).stat().st_size == n for sha, n in lfs.items()
    )
    if not present:
        hub.export_blobs(cdn)
    for sha in lfs:  # also puts the blobs in the page cache nginx serves from
        if sha256_of(cdn / sha) != sha:
            raise BenchError(f"exported blob {cdn / sha} does not hash to its name")


# --- verification -------------------------------------------------------------------------


def verify_files(tool: str, got: dict[str, Path], repo: RepoFiles) -> None:
    """Every expected file, and nothing else, with the generated file's sha256."""
    if set(got) != set(repo.sha256):
        missing = sorted(set(repo.sha256) - set(got))
        extra = sorted(set(got) - set(repo.sha256))
        raise BenchError(f"{tool} installed the wrong files: missing {missing}, extra {extra}")
    for path, local in got.items():
        if sha256_of(local) != repo.sha256[path]:
            raise BenchError(f"{tool}: {path} does not have the generated file's sha256")


def check_hub_log(setup: Setup, tool: str) -> dict[str, int]:
    """Refuse a run whose LFS bytes came from the Python Hub; return its request counts."""
    lfs_served = sum(
        r.body_bytes_sent
        for r in setup.hub.requests
        if "/resolve/" in r.path and r.path.split("/", 5)[-1] in setup.repo.lfs_paths
    )
    if lfs_served:
        raise BenchError(
            f"{tool}: the Python Hub served {lfs_served} bytes of LFS files: "
            "they must come from nginx"
        )
    counts = {
        "head_resolve": setup.hub.count("HEAD", "/resolve/"),
        "get_resolve": setup.hub.count("GET", "/resolve/"),
        "api": setup.hub.count(None, "/api/"),
    }
    setup.hub.reset_log()
    return counts


# --- modelhost ----------------------------------------------------------------------------


@contextmanager
def modelhost_server(setup: Setup, home: Path, empty_cache: Path) -> Iterator[str]:
    """A modelhost server subprocess answering /health; yield its base URL; always stop it."""
    import httpx

    port = free_port()
    env = {
        **os.environ,
        **HF_ENV,
        "MODELHOST_HOME": str(home),
        "HF_ENDPOINT": setup.hub.base_url,
        "MODELHOST_URL_ALLOW": f"127.0.0.1:{setup.nginx_port}",
        "MODELHOST_URL_ALLOW_DEFAULTS": "false",
        "HF_HUB_CACHE": str(empty_cache),
        "MODELHOST_FETCH_PARALLEL_FILES": str(setup.parallel_files),
    }
    log = (setup.rundir / "modelhost.log").open("wb")
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
                text = (setup.rundir / "modelhost.log").read_text(errors="replace")
                raise BenchError(f"modelhost exited with status {proc.returncode}:\n{text}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"modelhost did not answer /health in {SERVER_START_TIMEOUT_S}s")
            time.sleep(0.05)
        yield base
    finally:
        stop_process(proc)
        log.close()


def wait_completed(client: httpx.Client, download_id: str) -> None:
    """Poll the job every ``POLL_S`` until it finishes; raise unless it completed."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        status = client.get(f"/models/download/status/{download_id}").json()
        if status["status"] == "completed":
            return
        if status["status"] in ("failed", "cancelled"):
            raise BenchError(f"modelhost job {status['status']}: {status['message']}")
        time.sleep(POLL_S)
    raise BenchError(f"modelhost job {download_id} did not finish in {RUN_TIMEOUT_S:.0f}s")


def installed_files(client: httpx.Client, repo: RepoFiles) -> dict[str, Path]:
    """The installed model's files (from its manifest), after checking the manifest's sha256."""
    info = client.get(f"/models/download/{MODEL_NAME}/info").json()
    recorded = {f["path"]: f["sha256"] for f in info["files"]}
    if recorded != repo.sha256:
        raise BenchError("modelhost's manifest sha256s differ from the generated files'")
    return {path: Path(info["path"]) / path for path in recorded}


def run_modelhost(setup: Setup, round_no: int) -> Run:
    """One modelhost download: fresh home and server, timed from POST to completed."""
    import httpx

    home = setup.rundir / "modelhost-home"
    empty_cache = setup.rundir / "empty-hf-cache"
    empty_cache.mkdir()
    with modelhost_server(setup, home, empty_cache) as base:
        with httpx.Client(base_url=base, timeout=120) as client:
            setup.hub.reset_log()
            settle(setup.settle_s)
            # The shards are random bytes, not weights: the download is what is measured.
            body = {"source": "huggingface", "model_id": REPO, "name": MODEL_NAME, "load": False}
            start = time.perf_counter()
            response = client.post("/models/download", json=body)
            posted = time.perf_counter() - start
            if response.status_code != 202:
                raise BenchError(f"POST /models/download: {response.status_code} {response.text}")
            wait_completed(client, response.json()["download_id"])
            seconds = time.perf_counter() - start
            hub_requests = check_hub_log(setup, "modelhost")
            verify_files("modelhost", installed_files(client, setup.repo), setup.repo)
            client.delete(f"/models/download/{MODEL_NAME}")
    size = setup.repo.total_bytes
    return Run(
        round_no,
        "modelhost",
        seconds,
        size / MIB / seconds,
        post_seconds=posted,
        hub_requests=hub_requests,
    )


# --- snapshot_download --------------------------------------------------------------------


def hf_worker(repo_id: str, cache_dir: str) -> int:
    """The snapshot_download side, in its own process: download, report JSON on stdout."""
    import inspect

    from huggingface_hub import snapshot_download

    start = time.perf_counter()
    path = snapshot_download(repo_id, cache_dir=cache_dir)
    elapsed = time.perf_counter() - start
    workers = inspect.signature(snapshot_download).parameters["max_workers"].default
    print(json.dumps({"seconds": elapsed, "path": path, "max_workers": workers}))
    return 0


def run_snapshot_download(setup: Setup, round_no: int) -> tuple[Run, int]:
    """One snapshot_download into a fresh cache; returns the run and its max_workers."""
    cache = setup.rundir / "hf-cache"
    env = {**os.environ, **HF_ENV, "HF_ENDPOINT": setup.hub.base_url}
    env.pop("HF_HUB_CACHE", None)
    cmd = [sys.executable, __file__, HF_WORKER_FLAG, REPO, str(cache)]
    setup.hub.reset_log()
    settle(setup.settle_s)
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise BenchError(f"snapshot_download failed ({result.returncode}):\n{result.stderr}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    hub_requests = check_hub_log(setup, "snapshot_download")
    snapshot = Path(report["path"])
    got = {p.relative_to(snapshot).as_posix(): p for p in snapshot.rglob("*") if p.is_file()}
    verify_files("snapshot_download", got, setup.repo)
    seconds = float(report["seconds"])
    size = setup.repo.total_bytes
    run = Run(
        round_no,
        "snapshot_download",
        seconds,
        size / MIB / seconds,
        wall_seconds=wall,
        hub_requests=hub_requests,
    )
    return run, int(report["max_workers"])


# --- the benchmark ------------------------------------------------------------------------


def settle(seconds: float) -> None:
    """Flush dirty pages of earlier runs and let memory settle (untimed; see SETTLE_S)."""
    os.sync()
    time.sleep(seconds)


def progress_printer(to_stderr: bool) -> Callable[[str], None]:
    """Where progress lines go: stderr when stdout carries the JSON summary."""

    def say(message: str) -> None:
        print(message, file=sys.stderr if to_stderr else sys.stdout, flush=True)

    return say


def clean_rundir(rundir: Path) -> None:
    """Delete everything a run left (homes, caches, logs)."""
    shutil.rmtree(rundir, ignore_errors=True)
    rundir.mkdir(parents=True)


def describe(run: Run) -> str:
    """One human-readable line for a run."""
    line = f"round {run.round}  {run.tool:<17} {run.seconds:8.3f} s  {run.mib_per_s:8.1f} MiB/s"
    if run.wall_seconds is not None:
        line += f"   (process wall {run.wall_seconds:.3f} s, imports included)"
    if run.post_seconds is not None:
        line += f"   (POST answered in {run.post_seconds:.3f} s, planning included)"
    return line


def summarize(runs: list[Run], size: int, rounds: int) -> dict[str, object]:
    """Medians per tool and the median of per-round time ratios modelhost / snapshot_download
    (modelhost's seconds / snapshot_download's: below 1, modelhost is faster)."""
    mh = {r.round: r for r in runs if r.tool == "modelhost"}
    hf = {r.round: r for r in runs if r.tool == "snapshot_download"}
    ratios = [mh[i].seconds / hf[i].seconds for i in range(rounds)]
    return {
        "size_bytes": size,
        "rounds": rounds,
        "modelhost_mib_per_s": statistics.median(r.mib_per_s for r in mh.values()),
        "snapshot_download_mib_per_s": statistics.median(r.mib_per_s for r in hf.values()),
        "round_time_ratios": ratios,
        "time_ratio": statistics.median(ratios),
        "runs": [asdict(r) for r in runs],
    }


def benchmark(args: argparse.Namespace) -> dict[str, object]:
    """Build the repo, start the test Hub and nginx, run the alternating rounds."""
    sys.path.insert(0, str(TESTS_DIR))
    from hubserver import HubServer

    if not os.access(NGINX, os.X_OK):
        raise BenchError(f"{NGINX} not found: apt-get install nginx-light")
    say = progress_printer(to_stderr=args.json)
    workdir = Path(args.workdir)
    files = build_repo(workdir / "repo", args.size_mb * MIB, args.files, say)
    rundir = workdir / "run"
    clean_rundir(rundir)
    runs: list[Run] = []
    hf_workers = None
    with HubServer() as hub:
        hub.add_repo(REPO, files)
        repo = served_repo(hub)
        export_cdn(hub, workdir / "cdn")
        with nginx_serving(workdir / "cdn", workdir / "nginx") as nginx_port:
            hub.redirect_lfs_to(f"http://127.0.0.1:{nginx_port}")
            setup = Setup(hub, repo, rundir, args.settle_s, args.parallel_files, nginx_port)
            say(
                f"repo {REPO}: {len(files)} files, {repo.total_bytes / MIB:.1f} MiB, "
                f"served by tests/hubserver.py at {hub.base_url}, LFS files redirected (302) "
                f"to nginx on 127.0.0.1:{nginx_port}; modelhost parallel files "
                f"{args.parallel_files}; {args.rounds} round(s), alternating order, "
                f"sync + {args.settle_s:g} s pause before each run"
            )
            for round_no in range(args.rounds):
                order = ("snapshot_download", "modelhost")
                for tool in order if round_no % 2 == 0 else order[::-1]:
                    clean_rundir(rundir)
                    if tool == "modelhost":
                        run = run_modelhost(setup, round_no)
                    else:
                        run, hf_workers = run_snapshot_download(setup, round_no)
                    runs.append(run)
                    say(describe(run))
            clean_rundir(rundir)
    shutil.rmtree(rundir, ignore_errors=True)
    shutil.rmtree(workdir / "nginx", ignore_errors=True)
    summary = summarize(runs, repo.total_bytes, args.rounds)
    summary.update(
        files=len(files),
        shards=args.files,
        parallel_files=args.parallel_files,
        snapshot_download_max_workers=hf_workers,
        settle_s=args.settle_s,
        note=NOTE,
    )
    return summary


def print_summary(summary: dict[str, object]) -> None:
    """The human-readable summary lines."""
    print(
        f"modelhost median:         {summary['modelhost_mib_per_s']:.1f} MiB/s "
        f"(MODELHOST_FETCH_PARALLEL_FILES={summary['parallel_files']})"
    )
    print(
        f"snapshot_download median: {summary['snapshot_download_mib_per_s']:.1f} MiB/s "
        f"(max_workers={summary['snapshot_download_max_workers']}, its default)"
    )
    print(f"note: {NOTE}")
    print(
        f"time modelhost/snapshot_download (median of {summary['rounds']} rounds): "
        f"{summary['time_ratio']:.2f} (below 1: modelhost is faster)"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="modelhost's Hugging Face download time divided by snapshot_download's "
        "(below 1: modelhost is faster)."
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument(
        "--size-mb", type=int, default=1024, help="MiB of weight shards in all (default 1024)"
    )
    parser.add_argument(
        "--files", type=int, default=16, help="weight shards, besides 5 small files (default 16)"
    )
    parser.add_argument(
        "--parallel-files",
        type=int,
        default=4,
        help="MODELHOST_FETCH_PARALLEL_FILES for the modelhost server (default 4, its default)",
    )
    parser.add_argument(
        "--workdir",
        default=str(Path(tempfile.gettempdir()) / "modelhost-bench-hub"),
        help="generated repo and blobs (kept for reuse) and the runs' output "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--settle-s",
        type=float,
        default=SETTLE_S,
        help="pause before each run, after sync (default %(default)s; see bench/fetch.py)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    args = parser.parse_args(argv)
    if min(args.rounds, args.size_mb, args.files, args.parallel_files) < 1 or args.settle_s < 0:
        parser.error(
            "--rounds, --size-mb, --files and --parallel-files must be at least 1, "
            "--settle-s not negative"
        )
    if args.size_mb * MIB < args.files:
        parser.error("--size-mb too small for that many --files")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the benchmark, print the results, return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [HF_WORKER_FLAG]:
        return hf_worker(*argv[1:])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_on_sigterm)  # so nginx and modelhost are stopped
    try:
        summary = benchmark(args)
    except BenchError as exc:
        print(f"bench/hub_fetch.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/hub_fetch.py: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
