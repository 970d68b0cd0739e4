"""Every error modelhost raises on purpose, each with the HTTP status it maps to.

Handlers and lower layers raise these; one exception handler in ``api.errors`` turns
them into modelhost's error body (``success: false``, ``message``, ``error``).
Anything else that escapes is a bug and answers 500.
"""

from __future__ import annotations

import errno

# The errnos of a write that found no space: a full disk, a quota, a file-size limit.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class ModelhostError(Exception):
    """Base class: ``message`` is for the user, ``error`` is a short machine-ish summary."""

    status_code = 500
    error = "Internal error"
    # The request field at fault, when one is (OpenAI's ``error.param`` on /v1 routes).
    param: str | None = None

    def __init__(self, message: str, *, error: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if error is not None:
            self.error = error
        if param is not None:
            self.param = param


class InvalidRequest(ModelhostError):
    status_code = 400
    error = "Invalid request"


class InputTooLong(InvalidRequest, ValueError):
    """An input longer than one request may carry (``MODELHOST_MAX_INPUT_CHARS``) or than
    the model takes in one forward (413): the message names the limit and where long texts
    go instead. Refused before anything runs: one request must not take the server's memory.
    A ``ValueError`` too, as the runtime's ``InvalidInput``: a bad input to Python callers."""

    status_code = 413
    error = "Input too long"


class InvalidName(InvalidRequest):
    error = "Invalid model name"


class InvalidSource(InvalidRequest):
    error = "Invalid source"


class NotTextToSpeech(InvalidRequest):
    """Speech asked of a model that cannot speak; the message lists the models that can, so
    the user (CLI, dashboard or API) learns what to ask for instead."""

    error = "Not a TTS model"

    def __init__(
        self, name: str, task: str, tts_models: list[str], hint: str = "", param: str | None = None
    ) -> None:
        listed = ", ".join(tts_models) if tts_models else "none"
        super().__init__(
            f"Model '{name}' is not a text-to-speech model (task: {task}); "
            f"installed TTS models: {listed}" + (f". {hint}" if hint else ""),
            param=param,
        )


class SourceNotAllowed(ModelhostError):
    """A URL whose scheme, host or resolved address the allow-list does not admit."""

    status_code = 403
    error = "Source not allowed"


class Unauthorized(ModelhostError):
    status_code = 401
    error = "Unauthorized"


class ModelNotFound(ModelhostError):
    status_code = 404
    error = "Model does not exist"


class JobNotFound(ModelhostError):
    status_code = 404
    error = "Download does not exist"


class Conflict(ModelhostError):
    status_code = 409
    error = "Conflict"


class NotImplementedYet(ModelhostError):
    """A feature the API names but this version has not built; says which issue builds it."""

    status_code = 501
    error = "Not implemented"


class InsufficientStorage(ModelhostError):
    status_code = 507
    error = "Insufficient storage"
    download_id: str | None = None  # the failed job that records a refusal, when one was made


class UpstreamError(ModelhostError):
    """The upstream host answered with an error or could not be reached."""

    status_code = 502
    error = "Upstream error"
    download_id: str | None = None  # the failed job that records it, when one was made


class UpstreamNotFound(UpstreamError):
    """The repository, revision or file does not exist upstream."""

    status_code = 404
    error = "Not found upstream"


class UpstreamDenied(UpstreamError):
    """The upstream refused us (private, gated, bad token)."""

    status_code = 403
    error = "Upstream refused access"


class UpstreamTimeout(UpstreamError):
    """The upstream accepted (or never accepted) the connection but did not answer in time."""

    status_code = 504
    error = "Upstream timed out"


# Errors of the fetch engine. They are raised in worker threads and end up in a
# job's ``message``; ``transient`` decides whether the engine retries.


class FetchError(ModelhostError):
    status_code = 502
    error = "Download failed"
    transient = False


class TransientFetchError(FetchError):
    """A dropped connection, a stall, a 5xx or 429: worth retrying with backoff."""

    transient = True


class FetchTimeout(TransientFetchError):
    """A connect or a read that ran past its timeout: retried like any transient fault, and
    told apart so that a metadata call can answer 504 naming the silent host."""

    error = "Upstream timed out"

    def __init__(self, message: str, *, host_port: str, timeout_s: float) -> None:
        super().__init__(message)
        self.host_port = host_port
        self.timeout_s = timeout_s


class DigestMismatch(FetchError):
    error = "Digest mismatch"


class SizeMismatch(FetchError):
    error = "Size mismatch"


class PickleRejected(FetchError):
    """A pickled weights file the converter refused: it is not a state dict, or its pickle
    asks for something outside tensor reconstruction. The job fails; nothing is installed."""

    status_code = 422
    error = "Pickled weights refused"


class Cancelled(ModelhostError):
    status_code = 409
    error = "Cancelled"


class MissingDependency(ModelhostError):
    """A Python module the request needs is not installed on the server (424 Failed
    Dependency): the message names the module and the exact ``pip install`` to run."""

    status_code = 424
    error = "Missing Python package"

    def __init__(self, message: str, *, module: str, package: str) -> None:
        super().__init__(message)
        self.module = module
        self.package = package


class LoadFailed(ModelhostError):
    """Loading an installed model failed for a reason no narrower error names (422): the
    model's files or its loader library; the message says what the loader raised."""

    status_code = 422
    error = "Load failed"


class HomeInUse(ModelhostError):
    """Another server holds this ``MODELHOST_HOME`` (its ``server.lock``): two servers on one
    home would run each other's jobs and race on the same partial files."""

    status_code = 409
    error = "Home in use"


class SpeechJobNotFound(ModelhostError):
    status_code = 404
    error = "Speech job does not exist"
