"""The ``local`` source: a model directory already on this machine, imported into the store.

Only directories under ``MODELHOST_IMPORT_ROOTS`` may be imported (none by default: the
source is off), so a request cannot make the server read arbitrary files. Paths are checked
after resolving symlinks: a link that leads out of the root is refused, never followed.
Every file is hashed here (sha256) and imported by the fetch engine like a download: the copy
in the store is hashed again and must match, so a file that changed in between fails the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from modelhost.errors import InvalidRequest, SourceNotAllowed
from modelhost.fetch import CancelToken, FileSpec
from modelhost.fetch.engine import local_url
from modelhost.sources.base import (
    DownloadRequest,
    PicklePolicy,
    Plan,
    SourceContext,
    decide_pickles,
)
from modelhost.sources.huggingface import TTS_ARCHITECTURES, TTS_TASKS
from modelhost.sources.url import PICKLE_SUFFIXES
from modelhost.spec import ModelSpec

ROOTS_SETTING = "MODELHOST_IMPORT_ROOTS"
# What ``transformers.Trainer`` saves beside a checkpoint's weights: the state to resume
# training (optimizer, scheduler, grad scaler, RNG states, pickled TrainingArguments). None of
# it is weights, none is a state dict of tensors the converter takes, and serving needs none.
TRAINING_STATE = re.compile(
    r"^(training_args\.bin|optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)$"
)
MAX_FILES = 10_000
CONFIG_LIMIT = 1024 * 1024
# Hashing reads this much between two looks at the cancel token (a few ms of sha256).
HASH_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class LocalFile:
    """A file of the directory: its path in the model, and the real file it reads."""

    path: str
    real: Path


def _refuse_outside(path: str, roots: tuple[Path, ...], how: str = "") -> SourceNotAllowed:
    return SourceNotAllowed(
        f"{path}{how} is outside the import roots ({ROOTS_SETTING} = "
        f"{','.join(str(r) for r in roots)}); import from a directory under one of them, "
        f"or add its parent to {ROOTS_SETTING}",
        error="Outside the import roots",
    )


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_directory(model_id: str, import_roots: tuple[Path, ...]) -> tuple[Path, Path]:
    """The real directory ``model_id`` names and the root it lies under, or a 4xx saying why."""
    if not import_roots:
        raise SourceNotAllowed(
            f"The local source is off: set {ROOTS_SETTING} to the directories models may be "
            "imported from (comma-separated absolute paths)",
            error="Local imports not enabled",
        )
    if "\0" in model_id or not model_id.startswith("/"):
        raise InvalidRequest(
            f"model_id {model_id!r} must be an absolute directory path for the local source",
            error="Invalid path",
        )
    if ".." in PurePosixPath(model_id).parts:
        raise InvalidRequest(
            f"model_id {model_id!r} contains '..': give the directory's plain absolute path",
            error="Invalid path",
        )
    roots = tuple(Path(os.path.realpath(r)) for r in import_roots)
    real = Path(os.path.realpath(model_id))
    root = next((r for r in roots if _within(real, r)), None)
    if root is None:
        lexical = Path(os.path.normpath(model_id))
        inside = any(_within(lexical, Path(os.path.normpath(r))) for r in import_roots)
        how = f" (a symlink to {real})" if inside else ""
        raise _refuse_outside(model_id, import_roots, how)
    if not real.exists():
        raise InvalidRequest(f"{model_id} does not exist", error="No such directory")
    if not real.is_dir():
        raise InvalidRequest(
            f"{model_id} is not a directory: the local source imports a model directory",
            error="Not a directory",
        )
    return real, root


def list_files(directory: Path, root: Path, import_roots: tuple[Path, ...]) -> list[LocalFile]:
    """Every file under ``directory`` (hidden entries such as ``.git`` skipped), following
    symlinks that stay inside ``root`` and refusing those that leave it."""
    found: list[LocalFile] = []
    seen: set[Path] = set()

    def walk(real_dir: Path, prefix: str) -> None:
        if real_dir in seen:
            return  # a link back to a directory already listed
        seen.add(real_dir)
        with os.scandir(real_dir) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue
                shown = prefix + entry.name
                if "\\" in entry.name:
                    raise InvalidRequest(f"Unsupported file name {shown!r} (a backslash)")
                real = Path(os.path.realpath(entry.path))
                if not _within(real, root):
                    raise _refuse_outside(shown, import_roots, f" (a symlink to {real})")
                if real.is_dir():
                    walk(real, shown + "/")
                elif real.is_file():
                    found.append(LocalFile(shown, real))
                else:
                    raise InvalidRequest(f"{shown} is neither a file nor a directory")
                if len(found) > MAX_FILES:
                    raise InvalidRequest(
                        f"{directory} holds more than {MAX_FILES} files; not a model directory"
                    )

    walk(directory, "")
    if not found:
        raise InvalidRequest(f"{directory} holds no files to import", error="Empty directory")
    return found


def _without_training_state(files: list[LocalFile]) -> tuple[list[LocalFile], list[str]]:
    """The files minus a Trainer checkpoint's training state (``TRAINING_STATE``): left out,
    so that only weights go to the converter. Returns (kept, left-out paths)."""
    left_out = [f.path for f in files if TRAINING_STATE.match(PurePosixPath(f.path).name)]
    return [f for f in files if f.path not in left_out], left_out


def _without_pickled_copies(files: list[LocalFile]) -> tuple[list[LocalFile], list[str]]:
    """The files minus pickled weights in a folder that has safetensors weights: the same
    weights again, as the huggingface source's selection treats them (converting them would
    also collide with the safetensors file's name). Returns (kept, skipped paths)."""

    def folder(path: str) -> str:
        return str(PurePosixPath(path).parent)

    with_safetensors = {folder(f.path) for f in files if f.path.endswith(".safetensors")}
    skipped = [
        f.path
        for f in files
        if f.path.lower().endswith(PICKLE_SUFFIXES) and folder(f.path) in with_safetensors
    ]
    return [f for f in files if f.path not in skipped], skipped


def _pickles_to_convert(
    files: list[LocalFile], policy: PicklePolicy, allow_pickle: bool
) -> list[str]:
    """The pickled files the converter turns into safetensors (``decide_pickles`` rules)."""
    pickled = [f.path for f in files if f.path.lower().endswith(PICKLE_SUFFIXES)]
    return decide_pickles(
        pickled,
        policy,
        allow_pickle,
        f"This directory holds pickled weights ({', '.join(pickled[:3])}) that are not state "
        'dicts modelhost can convert, and pickles can run code when loaded. Set "allow_pickle": '
        "true to import them (they will be loaded with weights_only=True), or convert them to "
        "safetensors first",
    )


def unreadable(exc: PermissionError, model_id: str) -> InvalidRequest:
    """A file or directory the server's user may not read, as a 400 naming it (the job would
    otherwise fail later, or the request answer 500)."""
    path = exc.filename or model_id
    return InvalidRequest(
        f"{path} cannot be read by the server ({exc.strerror or 'permission denied'}): give "
        "the server's user read access to it, or import another directory",
        error="Permission denied",
    )


def hash_file(path: Path, cancel: CancelToken | None) -> tuple[str, int]:
    """sha256 and size of ``path``, read once; a cancel stops it within one chunk (a
    multi-GB file takes seconds, and a cancelled plan must not hold its thread)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            if cancel is not None:
                cancel.raise_if_cancelled()
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _read_config(files: list[LocalFile]) -> dict:
    """The model's config.json, or {} when it has none (or it is not a JSON object)."""
    config = next((f for f in files if f.path == "config.json"), None)
    if config is None or config.real.stat().st_size > CONFIG_LIMIT:
        return {}
    try:
        data = json.loads(config.real.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class LocalSource:
    name = "local"

    def plan(self, request: DownloadRequest, context: SourceContext) -> Plan:
        """Check the directory against the import roots, list and hash its files. Blocking
        (the manager runs it in a thread); a cancel of ``context.cancel`` stops the hashing."""
        try:
            return self._plan(request, context)
        except PermissionError as exc:
            raise unreadable(exc, request.model_id) from exc

    def _plan(self, request: DownloadRequest, context: SourceContext) -> Plan:
        directory, root = check_directory(request.model_id, context.import_roots)
        files = list_files(directory, root, context.import_roots)
        files, training = _without_training_state(files)
        files, skipped = _without_pickled_copies(files)
        convert = _pickles_to_convert(files, context.pickle_policy, request.allow_pickle)
        specs = []
        tree = hashlib.sha256()
        for item in files:
            sha256, size = hash_file(item.real, context.cancel)
            tree.update(f"{item.path}\0{sha256}\n".encode())
            specs.append(
                FileSpec(
                    url=local_url(item.real),
                    path=item.path,
                    size=size,
                    sha256=sha256,
                    local_source=str(item.real),
                )
            )
        config = _read_config(files)
        architecture = config.get("model_type")
        architecture = architecture if isinstance(architecture, str) else None
        is_tts = request.task in TTS_TASKS or architecture in TTS_ARCHITECTURES
        return Plan(
            source=self.name,
            # As asked (normalised), so asking again finds the installed model.
            model_id=os.path.normpath(request.model_id),
            # As for the huggingface source: unless the request names a task, the runtime
            # reads it from the model's own config.
            task=request.task if "task" in request.model_fields_set else None,
            files=specs,
            # The content of the tree: the same files give the same revision.
            revision=tree.hexdigest(),
            spec=ModelSpec(
                model_type="tts" if is_tts else architecture,
                description=f"{directory} ({len(specs)} files)",
                architecture=architecture,
                directory=str(directory),
                notes=[
                    *(f"left out {path}: training state, not needed to serve" for path in training),
                    *(f"skipped {path}: the folder has safetensors weights" for path in skipped),
                ],
            ),
            convert=convert,
        )
