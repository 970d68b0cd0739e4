"""Seconds from launching `modelhost serve` to its first `GET /health` answer.

    python bench/startup.py [starts]

Each start gets a fresh, empty home and a free port; one untimed start first fills the OS
file cache, and the package's bytecode is compiled first (as ``pip install`` does; an
editable checkout under PYTHONDONTWRITEBYTECODE would compile every module on each start).
Prints every start and the median (the README's figure). For comparison it also
times `python -c "import torch"` alone, alternating with the starts: what the startup would
cost on top if torch were still imported on the way.
"""

from __future__ import annotations

import compileall
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MODELHOST = shutil.which("modelhost", path=str(Path(sys.executable).parent)) or "modelhost"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seconds_to_health() -> float:
    """Launch the server in a fresh home; seconds until /health answers 200."""
    home, port = tempfile.mkdtemp(prefix="mh-start-"), free_port()
    start = time.perf_counter()
    process = subprocess.Popen(
        [MODELHOST, "serve", "--port", str(port), "--home", home, "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit("modelhost serve exited before answering")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    return time.perf_counter() - start
            except OSError:
                time.sleep(0.01)
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


def seconds_to_import_torch() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - start


def main() -> None:
    starts = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    import modelhost

    compileall.compile_dir(Path(modelhost.__file__).parent, quiet=1)
    seconds_to_health()  # warm the file cache
    serve, torch_import = [], []
    for _ in range(starts):
        serve.append(seconds_to_health())
        torch_import.append(seconds_to_import_torch())
    print(f"modelhost serve -> /health: {[round(s, 3) for s in serve]} s")
    print(f"  median {statistics.median(serve):.3f} s over {starts} starts")
    print(f"python -c 'import torch' alone: median {statistics.median(torch_import):.3f} s")


if __name__ == "__main__":
    main()
