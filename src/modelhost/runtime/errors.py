"""The runtime's errors, rooted in ``modelhost.errors`` so the API maps them to a status.

``InvalidInput`` is also a ``ValueError``: bad inference inputs are plain value errors to
Python callers and 400s to HTTP clients.
"""

from __future__ import annotations

from modelhost.errors import Conflict, InvalidRequest


class UnsupportedModel(InvalidRequest):
    """The installed model is of a kind the runtime has no loader for (400)."""

    error = "Unsupported model"


class PickleNotAllowed(InvalidRequest):
    """The model's only weights are pickled and the caller did not opt in (400)."""

    error = "Pickled weights need opt-in"


class PickleRefused(InvalidRequest):
    """torch's weights_only unpickler refused a stored pickle: it asks for something
    outside tensor reconstruction (400); nothing of it ran."""

    error = "Pickled weights refused"


class InvalidInput(InvalidRequest, ValueError):
    """An inference input the model cannot take: says what it expected (400)."""

    error = "Invalid input"


class InvalidDevice(InvalidRequest, ValueError):
    """A device setting that is malformed (400)."""

    error = "Device not available"


class DeviceUnavailable(InvalidDevice):
    """A well-formed device this machine lacks (CUDA, MPS, a GPU index past the last): 409,
    a conflict with the server's state, not a malformed request (the schema, which shows the
    device syntax, cannot know what this machine has)."""

    status_code = 409


class ModelNotLoaded(Conflict):
    """The model is installed (or not) but not loaded in this server (409)."""

    error = "Model not loaded"


class MemoryBudgetExceeded(Conflict):
    """Loading would exceed the model-count or memory budget, and what would have to be
    unloaded to make room is pinned (or the model alone is over budget) (409)."""

    error = "Memory budget exceeded"


class MalformedWeights(InvalidRequest):
    """A weights or config file of the model is damaged or not what it claims (400)."""

    error = "Malformed model file"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (its type's name when it has none): what an
    error message quotes of a library's exception."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
