"""The ``torchvision`` source: a torchvision architecture's published weights file.

``model_id`` is an architecture name (``resnet50``), optionally with a weights enum member
(``resnet50:IMAGENET1K_V2``; default: the enum's DEFAULT). The file comes from the enum's URL
(or the configured mirror) through the fetch engine, and is verified against the sha256
prefix its name carries (``resnet50-11ad3fa6.pth``). torchvision is only read for metadata.
"""

from __future__ import annotations

import posixpath
import re
from urllib.parse import urlsplit

from modelhost.errors import InvalidRequest, ModelNotFound
from modelhost.fetch import FileSpec
from modelhost.packages import missing_dependency
from modelhost.sources.base import DownloadRequest, Plan, SourceContext, decide_pickles
from modelhost.spec import ModelSpec

MODEL_ID = re.compile(r"^([a-z][a-z0-9_]{0,63})(?::([A-Za-z0-9_]{1,64}))?$")
HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth?$")


def resolve_weights(model_id: str):  # -> torchvision WeightsEnum member
    """The weights enum member ``model_id`` names, or a 4xx saying what exists."""
    try:
        import torchvision
    except ModuleNotFoundError as exc:
        raise missing_dependency(exc.name or "torchvision", "The torchvision source") from exc
    except ImportError as exc:  # installed, but broken (e.g. built for another torch)
        raise InvalidRequest(
            f"The torchvision source needs torchvision, which fails to import: {exc}",
            error="torchvision broken",
        ) from exc
    match = MODEL_ID.fullmatch(model_id)
    if not match:
        raise InvalidRequest(
            f"Invalid model_id {model_id!r}: use a torchvision architecture name, optionally "
            "with a weights name, e.g. 'resnet50' or 'resnet50:IMAGENET1K_V2'",
            error="Invalid model id",
        )
    name, member = match.groups()
    if name not in torchvision.models.list_models():
        close = [m for m in torchvision.models.list_models() if name[:4] in m][:8]
        raise ModelNotFound(
            f"torchvision has no architecture {name!r}"
            + (f"; close: {', '.join(close)}" if close else ""),
            error="Unknown torchvision model",
        )
    try:
        enum = torchvision.models.get_model_weights(name)
    except ValueError as exc:
        raise ModelNotFound(f"torchvision publishes no weights for {name!r}") from exc
    if member is None:
        return name, enum.DEFAULT
    try:
        return name, enum[member]
    except KeyError:
        raise ModelNotFound(
            f"{name} has no weights {member!r}; it has: {', '.join(w.name for w in enum)}",
            error="Unknown weights",
        ) from None


class TorchvisionSource:
    name = "torchvision"

    def plan(self, request: DownloadRequest, context: SourceContext) -> Plan:
        """The weights file of the enum member, from its URL or the mirror."""
        architecture, weights = resolve_weights(request.model_id)
        filename = posixpath.basename(urlsplit(weights.url).path)
        convert = decide_pickles(
            [filename],
            context.pickle_policy,
            request.allow_pickle,
            "torchvision publishes its weights as pickled .pth files. Set "
            '"allow_pickle": true to install them; they are loaded with '
            "torch.load(weights_only=True), which reads tensors and runs no code",
        )
        url = weights.url
        mirror = context.mirrors.get(self.name)
        if mirror:
            url = mirror.rstrip("/") + "/" + filename
        prefix = HASH_IN_NAME.search(filename)
        spec = FileSpec(
            url=url,
            path=filename,
            size=context.engine.probe(url, context.cancel).size,
            sha256_prefix=prefix.group(1) if prefix else None,
        )
        return Plan(
            source=self.name,
            model_id=request.model_id,
            task="image-classification",
            files=[spec],
            revision=f"{type(weights).__name__}.{weights.name}",
            spec=ModelSpec(
                model_type="vision",
                description=f"torchvision {architecture} with {weights.name} weights",
                load_as=f"torchvision:{architecture}",
                weights=weights.name,
                categories_count=len(weights.meta.get("categories") or []),
            ),
            convert=convert,
        )
