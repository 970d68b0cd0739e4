"""The fetch engine: resumable, verified, cancellable transfers from allow-listed URLs."""

from modelhost.fetch.cancel import CancelToken
from modelhost.fetch.engine import FetchedFile, FetchEngine, FileSpec, RemoteInfo, RetryPolicy
from modelhost.fetch.policy import UrlPolicy
from modelhost.fetch.progress import Progress, ProgressSnapshot

__all__ = [
    "CancelToken",
    "FetchEngine",
    "FetchedFile",
    "FileSpec",
    "Progress",
    "ProgressSnapshot",
    "RemoteInfo",
    "RetryPolicy",
    "UrlPolicy",
]
