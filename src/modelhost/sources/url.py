"""The ``url`` source: one file from a direct, allow-listed URL."""

from __future__ import annotations

import posixpath
from urllib.parse import unquote, urlsplit

from modelhost.errors import InvalidRequest
from modelhost.fetch import FileSpec
from modelhost.names import NAME_PATTERN
from modelhost.sources.base import DownloadRequest, Plan, SourceContext, decide_pickles
from modelhost.spec import ModelSpec

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")
# What a file loads as decides its task when the request names none (the API's default,
# text-generation, would be wrong for both).
LOADS_AS_TASK = {"torchscript": "tensor", "torchvision": "image-classification"}
BARE_FILE_NOTE = (
    "a bare weights file has no architecture to load it into: stored download-only "
    '(a TorchScript file loads with "load_as": "torchscript", a torchvision state dict '
    'with "load_as": "torchvision:<architecture>")'
)


def loader_of(load_as: str | None) -> str | None:
    """``torchvision:resnet18`` -> ``torchvision``; None without ``load_as``."""
    return load_as.partition(":")[0] if load_as else None


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
        convert = self._pickle_decision(filename, request, context)
        info = context.engine.probe(target.url, context.cancel)
        spec = FileSpec(
            url=request.model_id,
            path=filename,
            size=info.size,
            sha256=request.sha256.lower() if request.sha256 else None,
        )
        explicit = "task" in request.model_fields_set
        return Plan(
            source=self.name,
            model_id=request.model_id,
            task=request.task if explicit else LOADS_AS_TASK.get(loader_of(request.load_as)),
            files=[spec],
            revision=info.etag or info.last_modified,
            spec=ModelSpec(
                description=f"{filename} from {target.host}",
                load_as=request.load_as,
                loadable=request.load_as is not None,
                notes=[] if request.load_as else [BARE_FILE_NOTE],
            ),
            convert=convert,
        )

    @staticmethod
    def _pickle_decision(
        filename: str, request: DownloadRequest, context: SourceContext
    ) -> list[str]:
        """A pickled file: converted when it is a state dict (no load_as, or a torchvision
        architecture); a TorchScript archive is compiled code, not a state dict, so it
        always needs allow_pickle."""
        if not filename.lower().endswith(PICKLE_SUFFIXES):
            return []
        torchscript = request.load_as == "torchscript"
        if torchscript:
            opt_in = (
                f"{filename} is a TorchScript archive (load_as: torchscript): compiled code, not "
                "a state dict, so it cannot be converted to safetensors. Set "
                '"allow_pickle": true to install it'
            )
        else:
            opt_in = (
                f"{filename} looks like pickled weights, which can run code when loaded. "
                'Prefer a .safetensors file, or set "allow_pickle": true to download it '
                "(it will be loaded with weights_only=True)"
            )
        return decide_pickles(
            [filename], context.pickle_policy, request.allow_pickle, opt_in, not torchscript
        )
