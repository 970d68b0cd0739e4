"""Pickled state dicts turned into safetensors by an isolated worker process.

The server never unpickles a downloaded file itself (under ``MODELHOST_PICKLE_POLICY=convert``).
``convert_pickles`` starts ``worker.py`` (beside this file) once per model with:

- ``python -I`` (no user site-packages, no PYTHON* variables, no script dir on sys.path),
- an environment of PATH, LANG and HOME (a fresh temporary directory) only: no tokens,
  no proxies, no HF_* variables,
- stdin closed, ``close_fds=True``, ``cwd`` that temporary directory, its own session (so a
  timeout kills it and anything it started),
- limits the worker sets on itself, soft and hard, before it reads any input: address space,
  CPU seconds, file size, open files, no core dump. They are set in the child rather than in a
  ``preexec_fn``, which is unsafe in a threaded server; the worker reports them as read back
  and the parent refuses its output unless they are the ones asked for,
- an audit hook in the worker that refuses sockets, subprocesses, exec/fork/spawn, ctypes,
  new imports and Python-level file writes before the first ``torch.load``,
- a wall-clock timeout.

What is not isolated: the worker runs as the server's user and can read what it can read
(no namespaces, seccomp or chroot: ``unshare`` is not relied on). The real guard against code
in a pickle is torch's restricted unpickler (``weights_only=True``); the rest is depth.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from modelhost.errors import Cancelled, FetchError, PickleRejected
from modelhost.fetch import CancelToken
from modelhost.store import CommitFile
from modelhost.store.manifest import Conversion

WORKER = Path(__file__).with_name("worker.py")
CONVERTIBLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HF_WEIGHTS = "pytorch_model"
SHARD = re.compile(r"^pytorch_model-(\d+-of-\d+)\.bin$")
PICKLED_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
GIB = 1024**3
# Importing torch alone maps about 3 GiB of address space; the rest is for the tensors.
BASE_ADDRESS_SPACE = 6 * GIB
OPEN_FILES = 1024
POLL_S = 0.1


@dataclass(frozen=True)
class ConvertLimits:
    """What one worker may use. ``address_space`` None: 6 GiB plus 3x the input's size
    (it is mmapped once, cloned tensors and the output buffer take at most the rest)."""

    timeout_s: float = 1800.0
    address_space: int | None = None

    def for_inputs(self, total_bytes: int, largest_bytes: int) -> dict[str, int]:
        """The rlimits the worker sets on itself for inputs of these sizes."""
        address_space = self.address_space or BASE_ADDRESS_SPACE + 3 * total_bytes
        return {
            "address_space": int(address_space),
            "cpu_seconds": max(1, int(self.timeout_s)),
            # Tied weights are cloned, so a file may grow; never past twice the input.
            "file_size": 2 * largest_bytes + 64 * 1024 * 1024,
            "open_files": OPEN_FILES,
            "core": 0,
        }


def converted_name(path: str) -> str:
    """Where a pickled file's safetensors go: the names transformers looks for
    (``pytorch_model.bin`` -> ``model.safetensors``, shards likewise), else the same stem."""
    pure = PurePosixPath(path)
    shard = SHARD.fullmatch(pure.name)
    if pure.name == f"{HF_WEIGHTS}.bin":
        name = "model.safetensors"
    elif shard:
        name = f"model-{shard.group(1)}.safetensors"
    else:
        name = pure.stem + ".safetensors"
    return str(pure.with_name(name))


def is_convertible(path: str) -> bool:
    """A file the converter takes: a pickle suffix it knows (not training_args.bin)."""
    name = PurePosixPath(path).name
    return name.endswith(CONVERTIBLE_SUFFIXES) and name != "training_args.bin"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _environment(home: str) -> dict[str, str]:
    """Only what Python and torch need: nothing that names a token, a proxy or a host."""
    return {
        "PATH": os.defpath,
        "LANG": "C.UTF-8",
        "HOME": home,
        "TMPDIR": home,
        "OMP_NUM_THREADS": "1",
    }


def describe_refusal(path: str, message: str, kind: str) -> str:
    """The worker's reason as a user reads it: which file, and what its pickle tried."""
    if kind == "not_state_dict":
        return (
            f"{path}: {message}. modelhost converts only state dicts to safetensors; a file "
            'like this needs "allow_pickle": true with "load_as" under '
            "MODELHOST_PICKLE_POLICY=allow"
        )
    found = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"global:? ([\w.]+)", message)
    if found:
        return (
            f"{path} is refused: its pickle tries to use {found.group(1)}, which is not part of "
            "a tensor state dict (it could run code); nothing was installed or run"
        )
    return f"{path} is refused: it is not a readable PyTorch state dict ({message})"


def run_worker(
    pairs: list[tuple[Path, Path]],
    limits: dict[str, int],
    timeout_s: float,
    cancel: CancelToken | None = None,
) -> dict:
    """Run the worker on (input, output) pairs; its JSON answer, or a typed error."""
    request = json.dumps({"limits": limits, "files": [[str(a), str(b)] for a, b in pairs]})
    with tempfile.TemporaryDirectory(prefix="modelhost-convert-") as home:
        process = subprocess.Popen(
            [sys.executable, "-I", str(WORKER), request],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            cwd=home,
            env=_environment(home),
            start_new_session=True,
        )
        stdout, stderr = _wait(process, timeout_s, cancel)
    names = {str(a): a for a, _ in pairs}
    if process.returncode == 2 and stderr.strip():
        answer = json.loads(stderr.strip().splitlines()[-1])
        return {"refused": answer, "path": names.get(answer.get("source"))}
    if process.returncode != 0:
        tail = " ".join(stderr.decode(errors="replace").split())[-600:]
        raise FetchError(
            f"The conversion worker failed (exit status {process.returncode}): {tail}",
            error="Conversion failed",
        )
    return json.loads(stdout)


def _wait(
    process: subprocess.Popen, timeout_s: float, cancel: CancelToken | None
) -> tuple[bytes, bytes]:
    """The worker's output; kills its whole session on timeout or cancel."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return process.communicate(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            late = time.monotonic() > deadline
            if late or (cancel is not None and cancel.cancelled):
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                if late:
                    raise FetchError(
                        f"Converting pickled weights took longer than {timeout_s:g} s "
                        "(MODELHOST_CONVERT_TIMEOUT_S); nothing was installed",
                        error="Conversion timed out",
                    ) from None
                cancel.raise_if_cancelled()  # type: ignore[union-attr]
                raise Cancelled("cancelled while converting") from None


def _shard_index(converted: dict[str, str], results: dict[str, dict]) -> bytes:
    """A safetensors index whose weight_map names the new files, built from the tensors the
    worker actually wrote."""
    weight_map = {}
    total = 0
    for original, new_path in converted.items():
        result = results[original]
        total += result["bytes"]
        name = PurePosixPath(new_path).name
        weight_map.update({key: name for key in result["keys"]})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return json.dumps(index, indent=2).encode()


def convert_pickles(
    files: list[CommitFile],
    to_convert: list[str],
    workdir: Path,
    limits: ConvertLimits,
    blob_path,
    cancel: CancelToken | None = None,
) -> tuple[list[CommitFile], list[Conversion]]:
    """``files`` with each path in ``to_convert`` replaced by its safetensors conversion.

    ``blob_path(sha256)`` locates inputs already in the store. Pickled shard indexes are
    replaced by a ``model.safetensors.index.json`` per folder. Blocking (a subprocess):
    call it in a worker thread. Raises ``PickleRejected`` naming the file and what its
    pickle tried; nothing is left in ``workdir`` on failure."""
    wanted = set(to_convert)
    inputs = [f for f in files if f.path in wanted]
    if not inputs:
        return files, []
    workdir.mkdir(parents=True, exist_ok=True)
    pairs, by_input = [], {}
    for index, item in enumerate(inputs):
        source = item.local_path or blob_path(item.sha256)
        target = workdir / f"{index}.safetensors"
        pairs.append((Path(source), target))
        by_input[str(source)] = item
    sizes = [item.size for item in inputs]
    answer = run_worker(pairs, limits.for_inputs(sum(sizes), max(sizes)), limits.timeout_s, cancel)
    if "refused" in answer:
        refused = answer["refused"]
        item = by_input.get(str(answer["path"]), inputs[0])
        raise PickleRejected(describe_refusal(item.path, refused["message"], refused["kind"]))
    _check_limits(answer["limits"], limits.for_inputs(sum(sizes), max(sizes)))
    return _assemble(files, inputs, pairs, answer, workdir)


def _check_limits(reported: dict[str, list[int]], asked: dict[str, int]) -> None:
    for name, value in asked.items():
        if reported.get(name) != [value, value]:
            raise FetchError(
                f"The conversion worker ran without its {name} limit ({reported.get(name)} "
                f"instead of {value}); its output is not used",
                error="Conversion not isolated",
            )


def _assemble(
    files: list[CommitFile],
    inputs: list[CommitFile],
    pairs: list[tuple[Path, Path]],
    answer: dict,
    workdir: Path,
) -> tuple[list[CommitFile], list[Conversion]]:
    """The commit list after conversion, and what each conversion was."""
    results = {r["source"]: r for r in answer["files"]}
    converted_paths, conversions, new_files = {}, [], []
    for item, (source, target) in zip(inputs, pairs, strict=True):
        new_path = converted_name(item.path)
        digest = sha256_file(target)
        new_files.append(CommitFile(new_path, target, target.stat().st_size, digest))
        converted_paths[str(source)] = new_path
        conversions.append(
            Conversion(
                original_path=item.path,
                original_size=item.size,
                original_sha256=item.sha256,
                converted_path=new_path,
                converted_sha256=digest,
                tensors=len(results[str(source)]["keys"]),
            )
        )
    gone = {item.path for item in inputs}
    indexes = [f for f in files if PurePosixPath(f.path).name == PICKLED_INDEX]
    for index in indexes:
        folder = PurePosixPath(index.path).parent
        mine = {
            src: new for src, new in converted_paths.items() if PurePosixPath(new).parent == folder
        }
        if not mine:
            continue
        gone.add(index.path)
        data = _shard_index(mine, results)
        target = workdir / f"index-{len(new_files)}.json"
        target.write_bytes(data)
        new_path = str(folder / SAFETENSORS_INDEX) if str(folder) != "." else SAFETENSORS_INDEX
        new_files.append(CommitFile(new_path, target, len(data), hashlib.sha256(data).hexdigest()))
    kept = [f for f in files if f.path not in gone]
    return kept + new_files, conversions
