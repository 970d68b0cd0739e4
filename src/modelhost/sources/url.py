"""The ``url`` source: one file from a direct, allow-listed URL."""

from __future__ import annotations

import posixpath
from urllib.parse import unquote, urlsplit

from modelhost.errors import InvalidRequest
from modelhost.fetch import FileSpec
from modelhost.names import NAME_PATTERN
from modelhost.sources.base import DownloadRequest, Plan, SourceContext

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")


def file_name_for(request: DownloadRequest) -> str:
    """The file's name in the model directory: ``filename`` or the URL's last path segment.

    The name comes from the request, never from a server header, and must be a plain name.
    """
    candidate = request.filename or posixpath.basename(unquote(urlsplit(request.model_id).path))
    if not candidate or not NAME_PATTERN.fullmatch(candidate) or ".." in candidate:
        raise InvalidRequest(
            f"Cannot use {candidate!r} as a file name: give a plain file name in 'filename' "
            "(letters, digits, '.', '_', '-')",
            error="Invalid file name",
        )
    return candidate


class UrlSource:
    name = "url"

    def plan(self, request: DownloadRequest, context: SourceContext) -> Plan:
        """Check the URL against the allow-list, then HEAD it for its real size."""
        target = context.engine.policy.check(request.model_id)
        filename = file_name_for(request)
        if filename.lower().endswith(PICKLE_SUFFIXES) and not request.allow_pickle:
            raise InvalidRequest(
                f"{filename} looks like pickled weights, which can run code when loaded. "
                'Prefer a .safetensors file, or set "allow_pickle": true to download it '
                "(it will be loaded with weights_only=True)",
                error="Pickled weights need opt-in",
            )
        info = context.engine.probe(target.url, context.cancel)
        spec = FileSpec(
            url=request.model_id,
            path=filename,
            size=info.size,
            sha256=request.sha256.lower() if request.sha256 else None,
        )
        return Plan(
            source=self.name,
            model_id=request.model_id,
            task=request.task,
            files=[spec],
            revision=info.etag or info.last_modified,
            description=f"{filename} from {target.host}",
            extra={"load_as": request.load_as} if request.load_as else {},
        )
