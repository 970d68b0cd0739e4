"""Device selection: ``auto`` picks CUDA, then MPS, then CPU; anything else is checked."""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelhost.runtime.errors import InvalidDevice

if TYPE_CHECKING:  # torch is imported by the functions: the server starts without it
    import torch

DEVICE_SETTINGS = "auto, cpu, cuda, cuda:N, mps"


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
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    if value == "mps":
        if not mps_available():
            raise InvalidDevice(f"device 'mps' is not available here; available: {available()}")
        return torch.device("mps")
    if value == "cuda" or value.startswith("cuda:"):
        index_text = value.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise InvalidDevice(f"invalid device {setting!r}: use one of {DEVICE_SETTINGS}")
        index = int(index_text)
        if not torch.cuda.is_available():
            raise InvalidDevice(
                f"device {setting!r} is not available: this torch sees no CUDA GPU "
                f"(available: {available()})"
            )
        count = torch.cuda.device_count()
        if index >= count:
            raise InvalidDevice(
                f"device {setting!r} is not available: {count} CUDA GPU(s) visible "
                f"(cuda:0 to cuda:{count - 1})"
            )
        return torch.device("cuda", index)
    raise InvalidDevice(f"invalid device {setting!r}: use one of {DEVICE_SETTINGS}")


def available() -> str:
    """The devices usable here, comma-separated, for messages."""
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
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
