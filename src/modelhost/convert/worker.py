"""The isolated child that turns pickled state dicts into safetensors files.

Run by the server as ``python -I worker.py REQUEST_JSON`` (see ``modelhost.convert``); it
imports nothing of modelhost, so ``-I`` (no user site, no PYTHON* variables, no script
directory on sys.path) costs nothing. Before it reads a byte of any pickle it:

- lowers its own resource limits, soft and hard (address space, CPU seconds, file size,
  open files, no core dumps), so a pickle cannot take the machine's memory or CPU, and
  cannot raise them back;
- installs an audit hook that refuses sockets, subprocesses, ``os.system``/``exec``/
  ``fork``/``spawn``, ``ctypes`` and Python-level writes to files, so even a bug in torch's
  restricted unpickler could not reach the network, run a program or write outside the
  output (safetensors writes its files from Rust, which the hook does not see).

Then it runs only ``torch.load(path, weights_only=True, map_location="cpu", mmap=True)``,
which refuses any global outside tensor reconstruction, checks the result is a flat dict of
str -> Tensor (or such a dict under ``state_dict``), and saves it with
``safetensors.torch.save_file``. The answer is one JSON line: on stdout when it worked, on
stderr (exit status 2) when the input was refused.
"""

from __future__ import annotations

import json
import resource
import sys

EXIT_REFUSED = 2
# Audit events that would reach outside the process. Checked by prefix.
FORBIDDEN_EVENTS = (
    "socket.",
    "subprocess.",
    "os.system",
    "os.exec",
    "os.fork",
    "os.forkpty",
    "os.posix_spawn",
    "os.spawn",
    "os.startfile",
    "os.kill",
    "os.killpg",
    "ctypes.",
    "urllib.",
    "http.",
    "ftplib.",
    "smtplib.",
    "webbrowser.",
    "import",  # nothing new is imported once the guards are in (see install_guards)
)
WRITE_MODES = set("wax+")
LIMITS = {
    "address_space": resource.RLIMIT_AS,
    "cpu_seconds": resource.RLIMIT_CPU,
    "file_size": resource.RLIMIT_FSIZE,
    "open_files": resource.RLIMIT_NOFILE,
    "core": resource.RLIMIT_CORE,
}


class Refused(Exception):
    """The input is not a state dict this worker will convert."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def set_limits(limits: dict[str, int]) -> dict[str, list[int]]:
    """Lower soft and hard limits to ``limits`` (names of ``LIMITS``); returns them as read
    back, so the parent can check they hold."""
    for name, value in limits.items():
        resource.setrlimit(LIMITS[name], (value, value))
    return {name: list(resource.getrlimit(LIMITS[name])) for name in LIMITS}


def _audit(event: str, args: tuple) -> None:
    if event.startswith(FORBIDDEN_EVENTS):
        raise PermissionError(f"the conversion worker may not do {event}")
    if event == "open" and len(args) > 1 and isinstance(args[1], str):
        if WRITE_MODES & set(args[1]):
            raise PermissionError(f"the conversion worker may not write {args[0]}")
    if event == "open" and len(args) > 2 and isinstance(args[2], int) and args[2] & 0o3:
        raise PermissionError(f"the conversion worker may not write {args[0]}")


def install_guards() -> None:
    """Import what conversion needs, then refuse imports, sockets, processes and writes.

    Imports come first: torch loads its extension modules through ctypes and opens files,
    which the hook would then refuse. An audit hook cannot be removed once added."""
    import io

    import numpy.ctypeslib  # noqa: F401  (safetensors' save imports it lazily)
    import torch
    import torch.utils.serialization.config  # noqa: F401  (torch.load imports it lazily)
    from safetensors.torch import save

    # One round trip in memory, so whatever else torch imports on first use is imported now.
    buffer = io.BytesIO()
    torch.save({"warm": torch.zeros(2)}, buffer)
    buffer.seek(0)
    save(torch.load(buffer, weights_only=True, map_location="cpu"))
    sys.addaudithook(_audit)


def _flat_tensors(obj: object, torch) -> dict | None:
    if (
        isinstance(obj, dict)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        return obj
    return None


def state_dict_of(obj: object, torch) -> dict:
    """The flat str -> Tensor dict ``obj`` is or holds under ``state_dict``; else Refused."""
    flat = _flat_tensors(obj, torch)
    if flat is None and isinstance(obj, dict):
        flat = _flat_tensors(obj.get("state_dict"), torch)
    if flat is None:
        found = type(obj).__name__
        if isinstance(obj, dict):
            kinds = sorted({type(v).__name__ for v in obj.values()})[:5]
            found = f"dict with {len(obj)} entries of {', '.join(kinds) or 'nothing'}"
        raise Refused(
            "not_state_dict",
            f"it is not a state dict (a flat mapping of names to tensors): it holds {found}",
        )
    return flat


def unshare(state: dict, torch) -> dict:
    """Tensors safetensors can write: contiguous, each owning its whole storage (tied
    weights, views and slices of one storage are cloned; keys are kept as they are)."""
    owners: dict[int, int] = {}
    for tensor in state.values():
        if tensor.device.type == "meta":
            continue
        ptr = tensor.untyped_storage().data_ptr()
        owners[ptr] = owners.get(ptr, 0) + 1
    out = {}
    for key, tensor in state.items():
        storage = tensor.untyped_storage()
        whole = (
            tensor.is_contiguous()
            and tensor.storage_offset() == 0
            and tensor.numel() * tensor.element_size() == storage.nbytes()
        )
        shared = owners.get(storage.data_ptr(), 0) > 1
        out[key] = tensor if whole and not shared else tensor.detach().clone().contiguous()
    return out


def load(path: str, torch) -> object:
    """torch's restricted unpickler; mmap so a large file is not read into memory twice."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except RuntimeError as exc:
        # Files from torch < 1.6 (not zip archives) cannot be mmapped; still weights_only.
        if "mmap" not in str(exc):
            raise
        return torch.load(path, weights_only=True, map_location="cpu")


def convert_one(source: str, target: str) -> dict:
    """Convert ``source`` to ``target``; returns its tensor names and their total bytes."""
    import torch
    from safetensors.torch import save_file

    try:
        obj = load(source, torch)
    except Exception as exc:  # UnpicklingError names the global the pickle asked for
        raise Refused("unpickling", " ".join(str(exc).split())[:2000]) from None
    state = unshare(state_dict_of(obj, torch), torch)
    save_file(state, target, metadata={"format": "pt"})
    return {
        "keys": sorted(state),
        "bytes": sum(t.numel() * t.element_size() for t in state.values()),
    }


def main(argv: list[str]) -> int:
    """``worker.py REQUEST_JSON``: {"limits": {...}, "files": [[in, out], ...]}."""
    request = json.loads(argv[1])
    limits = set_limits(request["limits"])
    install_guards()
    results = []
    for source, target in request["files"]:
        try:
            results.append({"source": source, **convert_one(source, target)})
        except Refused as exc:
            answer = {"source": source, "kind": exc.kind, "message": exc.message}
            sys.stderr.write(json.dumps(answer) + "\n")
            return EXIT_REFUSED
    sys.stdout.write(json.dumps({"limits": limits, "files": results}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
