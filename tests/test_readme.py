"""The README as a user meets it: its install on a fresh venv, then every runnable block.

``test_readme_runs_on_a_plain_install`` copies this tree (what a clone holds), creates a new
virtual environment, runs the Quick start's install block exactly as written in it (no test
extras: what a user gets from ``pip install .``), starts the Quick start's server block, and
runs every block marked ``runnable`` in order against a loopback Hub that serves the models
the blocks name (tiny real builds under the real repository ids, and the real
all-MiniLM-L6-v2 files). Each block must exit 0 and print the lines its ``text output``
block documents. Blocks that cannot run here say so in their fence and are checked for syntax
(``readme_blocks`` describes the fence words).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hubserver import HubServer
from readme_blocks import Block, output_matches, parse_blocks
from tiny_models import publish_all

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHELLS = ("bash", "sh")
# The catalog's ids the README's blocks name that the test Hub would not hold otherwise.
EXTRA_REPOS = {
    "openai/whisper-tiny": "whisper",
    "distilbert/distilbert-base-uncased-finetuned-sst-2-english": "bert",
}
# The README's examples talk to the default address, as a user's copy-paste does.
URL = "http://127.0.0.1:8000"
BLOCK_TIMEOUT_S = 300


def readme_blocks() -> list[Block]:
    return parse_blocks(README.read_text(encoding="utf-8"))


def _block_problems(path: Path, need_marks: bool) -> list[str]:
    problems = []
    for block in parse_blocks(path.read_text(encoding="utf-8")):
        where = block.label(path)
        if block.language in SHELLS:
            if need_marks and not block.runnable and "not-runnable" not in block.tags:
                problems.append(f"{where}: mark it `runnable` or `not-runnable: <why>`")
            elif "not-runnable" in block.tags and not block.reason:
                problems.append(f"{where}: `not-runnable` needs a reason after a colon")
            done = subprocess.run(["bash", "-n"], input=block.code, text=True, capture_output=True)
            if done.returncode != 0:
                problems.append(f"{where}: bash -n: {done.stderr.strip()}")
        elif block.language == "python":
            try:
                compile(block.code, where, "exec")
            except SyntaxError as exc:
                problems.append(f"{where}: {exc}")
    return problems


def test_every_shell_block_is_marked_and_parses() -> None:
    """Each README bash block says whether it runs here; every shell block of the README
    and of docs/ parses (``bash -n``); every Python block compiles."""
    problems = _block_problems(README, need_marks=True)
    for page in sorted((ROOT / "docs").glob("*.md")):
        problems += _block_problems(page, need_marks=False)
    assert not problems, "\n".join(problems)


def test_the_readme_has_an_install_a_server_and_examples_to_run() -> None:
    roles = [block.role for block in readme_blocks() if block.runnable]
    assert roles[:2] == ["install", "serve"], roles
    assert roles.count("example") >= 3, roles


def _copy_tree(target: Path) -> Path:
    """The files a clone of this tree holds (tracked and new, ignored ones left out)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def _user_env(venv: Path, home: Path, **extra: str) -> dict[str, str]:
    """A user's shell: the new venv first on PATH, none of this test run's Python settings."""
    inherited = ("PATH", "LANG", "LC_ALL", "TMPDIR", "TERM")
    env = {k: v for k, v in os.environ.items() if k in inherited}
    test_bin = str(Path(sys.executable).parent)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != test_bin]
    env.update(
        PATH=os.pathsep.join([str(venv / "bin"), *path]),
        VIRTUAL_ENV=str(venv),
        HOME=str(home),
        COLUMNS="200",
        NO_COLOR="1",
    )
    env.update(extra)
    return env


def _run(block: Block, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-eo", "pipefail", "-c", block.code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )


def _local_cpu_torch_wheel() -> Path | None:
    """PyTorch's CPU build for this Python, where pip's configured ``find-links`` hold one
    (download.pytorch.org, where the README sends a CPU-only user, is out of reach here)."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels: list[Path] = []
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            for folder in value.strip("'\"").split():
                wheels += Path(folder.removeprefix("file://")).glob(f"torch-*+cpu-{tag}-*.whl")
    return max(wheels, default=None)


def _has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia").exists()


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory) -> Iterator[Path]:
    """A new venv where the Quick start's install block ran as written: its path.

    On a machine without an NVIDIA GPU the Quick start tells users to install PyTorch's CPU
    build first; the test does the same, from this machine's disk when the CPU wheel lies
    there (about a minute and 4.5 GB less than the CUDA build), then runs the install block
    exactly as written. Elsewhere the block alone runs and brings the CUDA build."""
    root = tmp_path_factory.mktemp("plain-install")
    tree = _copy_tree(root / "modelhost")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    cpu_torch = None if _has_nvidia_gpu() else _local_cpu_torch_wheel()
    if cpu_torch is not None:
        first = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", str(cpu_torch)],
            env=_user_env(venv, root), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S,
        )
        assert first.returncode == 0, f"{cpu_torch.name}: {first.stdout[-3000:]}{first.stderr}"
    install = next(b for b in readme_blocks() if b.runnable and b.role == "install")
    done = _run(install, tree, _user_env(venv, root))
    assert done.returncode == 0, f"{install.label(README)}\n{done.stdout[-3000:]}{done.stderr}"
    yield venv
    # About 1.4 GB (6 GB with the CUDA build): not left in /tmp, but deleted beside the tests
    # that follow rather than before them (a minute of this disk's time under load).
    subprocess.Popen(
        ["rm", "-rf", str(root)], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def hub(tiny_models) -> Iterator[HubServer]:
    with HubServer() as server:
        publish_all(server, tiny_models)
        for repo_id, name in EXTRA_REPOS.items():
            server.add_repo(repo_id, tiny_models[name])
        yield server


def _port_8000_is_free() -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 8000))
        except OSError:
            return False
    return True


def _wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the README's server block did not answer at {url}")


def _check_announced(serve: Block, log: Path, timeout_s: float = 10) -> None:
    """The server block prints what its ``text output`` block says, once it listens."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = output_matches(serve.expected, log.read_text())
        if missing is None:
            return
        assert time.monotonic() < deadline, f"the server never printed {missing!r}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.early
def test_readme_runs_on_a_plain_install(plain_install: Path, hub: HubServer, tmp_path) -> None:
    """Every runnable block, in order, against the README's own server on a plain install."""
    import_check = subprocess.run(
        [str(plain_install / "bin" / "python"), "-c", "import sentence_transformers"],
        capture_output=True,
    )
    assert import_check.returncode != 0, "the plain install must not have the test extras"
    assert _port_8000_is_free(), (
        "port 8000 is in use: the README's examples talk to the default 127.0.0.1:8000, so "
        "this test needs it free (stop the server that holds it)"
    )
    work = tmp_path / "work"
    work.mkdir()
    # A user's shell with a fresh HOME (so the default MODELHOST_HOME, ~/.cache/modelhost, is
    # new) whose Hugging Face endpoint is the loopback Hub: nothing else differs.
    env = _user_env(
        plain_install,
        tmp_path,
        HF_ENDPOINT=hub.base_url,
        HF_HUB_DISABLE_XET="1",
        NO_PROXY="127.0.0.1,localhost",
    )
    blocks = [b for b in readme_blocks() if b.runnable and b.role != "install"]
    serve = next(b for b in blocks if b.role == "serve")
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        ["bash", "-c", serve.code], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_healthy(URL, server)
        _check_announced(serve, tmp_path / "server.log")
        for block in blocks:
            if block.role != "example":
                continue
            done = _run(block, work, env)
            output = done.stdout + done.stderr
            where = block.label(README)
            assert done.returncode == 0, f"{where} exited {done.returncode}:\n{output}"
            missing = output_matches(block.expected, output)
            assert missing is None, f"{where}: no line {missing!r} in:\n{output}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    printed = (tmp_path / "server.log").read_text()
    assert "Traceback" not in printed, printed[-3000:]
