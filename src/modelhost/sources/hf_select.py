"""Which files of a Hub repository are installed, and which of them are converted.

Shared by the Hub source (``huggingface``) and its offline twin (``hf_cache``), which
selects from a local huggingface_hub cache the same way; here so that neither imports the
other. ``RepoSnapshot`` is what both hand back: one repository at one commit, selected.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from modelhost.convert import converted_name
from modelhost.fetch import FileSpec
from modelhost.sources.base import DownloadRequest, PicklePolicy, decide_pickles
from modelhost.sources.hub_api import RepoFile

# Weight formats other frameworks use: skipped when safetensors weights exist (they are the
# same weights again), unless allow_patterns asks for them.
OTHER_FRAMEWORK_PATTERNS = (
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.onnx_data",
    "*.tflite",
    "*.ot",
    "*.gguf",
    "*.mlmodel",
    "*.mlpackage/*",
    "onnx/*",
    "openvino/*",
    "coreml/*",
    "*.ckpt",
    "*.ckpt.index",
    "*.pb",
)
PICKLE_WEIGHT_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle")
SAFETENSORS_PATTERN = "*.safetensors"


@dataclass(frozen=True)
class RepoSnapshot:
    """One repository at one commit: the files selected for installation."""

    repo_id: str
    requested_revision: str
    commit: str
    files: list[RepoFile]


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)


def select_files(
    files: list[RepoFile],
    allow_patterns: list[str] | None,
    ignore_patterns: list[str] | None,
    allow_pickle: bool,
    pickle_policy: PicklePolicy = "convert",
) -> list[RepoFile]:
    """The files a model needs to load: one weight format, no other frameworks' copies.

    ``allow_patterns`` / ``ignore_patterns`` (fnmatch, as huggingface_hub uses them) take
    precedence over the defaults. The pickle policy decides about pickled weights
    (``decide_pickles``): converted, refused, or admitted with ``allow_pickle``.
    """
    if allow_patterns:
        chosen = [f for f in files if _matches(f.path, allow_patterns)]
    else:
        has_safetensors = any(_matches(f.path, [SAFETENSORS_PATTERN]) for f in files)
        chosen = [f for f in files if not _matches(f.path, OTHER_FRAMEWORK_PATTERNS)]
        if has_safetensors:
            chosen = [f for f in chosen if not _matches(f.path, PICKLE_WEIGHT_PATTERNS)]
            # An index of pickled shards is useless without them.
            chosen = [f for f in chosen if f.path != "pytorch_model.bin.index.json"]
    if ignore_patterns:
        chosen = [f for f in chosen if not _matches(f.path, ignore_patterns)]
    if pickle_policy == "convert" and not allow_pickle:
        chosen = _without_pickles_beside_safetensors(chosen)
    pickled = pickled_weights(f.path for f in chosen)
    decide_pickles(
        pickled,
        pickle_policy,
        allow_pickle,
        f"This repository offers only pickled weights ({', '.join(pickled[:3])}), which can "
        'run code when loaded. Set "allow_pickle": true to install them (they will be '
        "loaded with weights_only=True), or pick a repository with safetensors weights",
    )
    return chosen


def _safetensors_folders(paths: Iterable[str]) -> set[PurePosixPath]:
    """The folders (the repository's root, ``vocoder/``...) that hold safetensors weights."""
    return {
        PurePosixPath(p).parent
        for p in paths
        if fnmatch.fnmatch(PurePosixPath(p).name, SAFETENSORS_PATTERN)
    }


def beside_safetensors(paths: Iterable[str]) -> set[str]:
    """The pickled files that safetensors weights of the same model make redundant: the
    Transformers pickles (``pytorch_model*.bin`` and their index) in a folder that holds
    safetensors weights, and any pickle whose converted name is already selected.

    Converting them would write names the safetensors already have
    (``pytorch_model.bin`` -> ``model.safetensors``): two files of one path."""
    paths = list(paths)
    selected = set(paths)
    folders = _safetensors_folders(paths)
    covered = set()
    for path in paths:
        pure = PurePosixPath(path)
        transformers_pickle = fnmatch.fnmatch(pure.name, "pytorch_model*.bin") or (
            pure.name == "pytorch_model.bin.index.json"
        )
        if transformers_pickle and pure.parent in folders:
            covered.add(path)
        elif pickled_weights([pure.name]) and converted_name(path) in selected:
            covered.add(path)
    return covered


def _without_pickles_beside_safetensors(chosen: list[RepoFile]) -> list[RepoFile]:
    """Leave out pickled weights that ``allow_patterns`` selected next to safetensors
    weights of the same model: the safetensors are installed, the pickle is not needed."""
    dropped = beside_safetensors(f.path for f in chosen)
    return [f for f in chosen if f.path not in dropped]


def select_for_request(
    files: list[RepoFile],
    request: DownloadRequest | None,
    allow_pickle: bool,
    pickle_policy: PicklePolicy,
) -> list[RepoFile]:
    """``select_files`` with the request's patterns and opt-in; without a request (a
    component such as the vocoder) the default selection with ``allow_pickle``."""
    if request is None:
        return select_files(files, None, None, allow_pickle, pickle_policy)
    return select_files(
        files, request.allow_patterns, request.ignore_patterns, request.allow_pickle, pickle_policy
    )


def pickled_weights(paths: Iterable[str]) -> list[str]:
    """The paths that are pickled weights (what the pickle policy decides about)."""
    return [p for p in paths if _matches(p, PICKLE_WEIGHT_PATTERNS)]


def to_convert(specs: list[FileSpec], policy: PicklePolicy, allow_pickle: bool) -> list[str]:
    """The planned files the converter turns into safetensors (main repo and components)."""
    # Component files carry their folder (vocoder/...): match the patterns on the name.
    # Pickles kept beside safetensors (allow_pickle) stay pickles: converted, they would
    # collide with the safetensors' names.
    covered = beside_safetensors(s.path for s in specs)
    pickled = [
        s.path
        for s in specs
        if pickled_weights([PurePosixPath(s.path).name]) and s.path not in covered
    ]
    return decide_pickles(pickled, policy, allow_pickle, "") if policy == "convert" else []
