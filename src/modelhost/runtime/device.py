"""Device selection: ``auto`` picks CUDA, then MPS, then CPU; anything else is checked."""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

from modelhost.names import DEVICE_PATTERN
from modelhost.runtime.errors import DeviceUnavailable, InvalidDevice

if TYPE_CHECKING:  # torch is imported by the functions: the server starts without it
    import torch

DEVICE_SETTINGS = "auto, cpu, cuda, cuda:N, mps"
_DEVICE = re.compile(DEVICE_PATTERN)


@functools.cache
def cuda_status() -> tuple[bool, str]:
    """Whether this process can use CUDA, and why not when it cannot. Cached: the answer
    holds for the process's life. The first call imports torch (seconds): call it in a
    worker thread, never on the event loop."""
    import torch

    if torch.cuda.is_available():
        return True, ""
    if torch.version.cuda is None:
        return False, f"this torch ({torch.__version__}) is built without CUDA"
    return False, (
        f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) finds no usable "
        "NVIDIA GPU or driver"
    )


def cuda_unavailable(setting: str) -> DeviceUnavailable:
    """The refusal of a CUDA device on a machine where CUDA is not available (409)."""
    _, why = cuda_status()
    return DeviceUnavailable(
        f"CUDA is not available on this server: {why}; use device cpu or auto "
        f"(device {setting!r} was asked for; available: {available()})"
    )


def check_requested_device(setting: str | None) -> None:
    """Refuse a request's device that is malformed (``InvalidDevice``, 400), or that names
    CUDA where this process has none (``DeviceUnavailable``, 409), before any work is done
    for the request. Blocking for a CUDA device (imports torch once): call it in a worker
    thread."""
    if setting is None:
        return
    value = setting.strip().lower() or "auto"  # as resolve_device reads an empty setting
    if not _DEVICE.fullmatch(value):
        raise InvalidDevice(f"invalid device {setting!r}: use one of {DEVICE_SETTINGS}")
    if value.startswith("cuda") and not cuda_status()[0]:
        raise cuda_unavailable(setting)


def mps_available() -> bool:
    """Whether Apple's Metal backend is built into this torch and usable."""
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(setting: str) -> torch.device:
    """The device ``setting`` names (``MODELHOST_DEVICE`` or a request's ``device``).

    ``auto`` is the first available of CUDA (device 0), MPS and CPU. A device that is named
    but not available here raises ``InvalidDevice`` (a ``ValueError``) saying what is.
    """
    import torch

    value = (setting or "auto").strip().lower()
    if value == "auto":
        if cuda_status()[0]:
            return torch.device("cuda", 0)
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    if value == "mps":
        if not mps_available():
            raise DeviceUnavailable(
                f"device 'mps' is not available here; available: {available()}"
            )
        return torch.device("mps")
    if value == "cuda" or value.startswith("cuda:"):
        index_text = value.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise InvalidDevice(f"invalid device {setting!r}: use one of {DEVICE_SETTINGS}")
        index = int(index_text)
        if not cuda_status()[0]:
            raise cuda_unavailable(setting)
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceUnavailable(
                f"device {setting!r} is not available: {count} CUDA GPU(s) visible "
                f"(cuda:0 to cuda:{count - 1})"
            )
        return torch.device("cuda", index)
    raise InvalidDevice(f"invalid device {setting!r}: use one of {DEVICE_SETTINGS}")


def available() -> str:
    """The devices usable here, comma-separated, for messages."""
    import torch

    names = ["cpu"]
    if cuda_status()[0]:
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if mps_available():
        names.append("mps")
    return ", ".join(names)


def device_str(device: torch.device) -> str:
    """``cuda:0`` rather than ``cuda``: the form reported to clients."""
    if device.type == "cuda":
        import torch

        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type
