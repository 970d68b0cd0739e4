"""Which family an installed model is: the first registered adapter that claims it.

The name of a model is never consulted. ``config.json``'s ``model_type`` and
``architectures`` (what ``save_pretrained`` recorded) and the task the model was installed
for are the only evidence; when they do not point at a supported family the error says
what is supported.
"""

from __future__ import annotations

from pathlib import Path

from modelhost.runtime.errors import UnsupportedModel
from modelhost.runtime.families.base import DetectContext
from modelhost.runtime.families.registry import adapters
from modelhost.runtime.families.vocabulary import SUPPORTED, FamilyInfo, check_loadable
from modelhost.store.manifest import Manifest


def detect_family(manifest: Manifest, path: Path) -> FamilyInfo:
    """The loader family for an installed model, from its task and ``config.json``: the
    first registered adapter (``families.registry``) whose ``detect`` claims it.

    Raises ``UnsupportedModel`` naming what was found and what is supported.
    """
    check_loadable(manifest)
    ctx = DetectContext(manifest, Path(path))
    for adapter in adapters():
        info = adapter.detect(ctx)
        if info is not None:
            return info
    raise _no_family(ctx)


def _no_family(ctx: DetectContext) -> UnsupportedModel:
    """Why no adapter claimed the model, in the order the evidence is read."""
    if not ctx.config:
        return UnsupportedModel(
            f"Model {ctx.manifest.name!r} has no config.json: only Transformers-layout models "
            "(from_pretrained directories) and TorchScript files (url source with "
            f'load_as "torchscript") can be loaded. Supported: {SUPPORTED}'
        )
    task = ctx.task
    if task == "text-to-speech":
        return ctx.unsupported("text-to-speech needs a SpeechT5, Bark or VITS model")
    if task == "automatic-speech-recognition":
        return ctx.unsupported("speech recognition is supported with Whisper models only")
    if ctx.resolved_task is None:
        return ctx.unsupported("no task was recorded and the architectures do not name one")
    return ctx.unsupported(f"no loader for task {ctx.resolved_task}")
