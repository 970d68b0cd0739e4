"""The ``huggingface`` source: a Hub repository, pinned to a commit, as a list of files.

Metadata comes from ``huggingface_hub`` (``HfApi``: revision, file listing with sizes, LFS
sha256 and git blob ids; ``HF_ENDPOINT`` and ``HF_TOKEN`` honoured); the bytes move through
modelhost's fetch engine, so resume, verification and progress apply to every file. A TTS
model may bring its vocoder along as a component of the same logical model.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from modelhost.catalog import entry_for_model_id, load_catalog
from modelhost.errors import (
    DigestMismatch,
    InvalidRequest,
    ModelhostError,
    UpstreamDenied,
    UpstreamError,
    UpstreamNotFound,
)
from modelhost.fetch import FileSpec
from modelhost.fetch.engine import is_local_only
from modelhost.sources.base import DownloadRequest, Plan, SourceContext

REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

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

TTS_TASKS = {"text-to-speech", "text-to-audio"}
TTS_ARCHITECTURES = {"speecht5", "bark", "vits"}
# Vocoders a text-to-spectrogram model needs to make audio. Bark and VITS make waveforms.
DEFAULT_VOCODERS = {"speecht5": "microsoft/speecht5_hifigan"}
VOCODER_DIR = "vocoder"


@dataclass(frozen=True)
class HubSettings:
    """Where the Hub is and who we are to it."""

    endpoint: str
    token: str | None
    cache_dir: Path | None  # a huggingface_hub cache to import verified files from
    offline: bool = False  # HF_HUB_OFFLINE: plan and install from cache_dir alone


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
) -> list[RepoFile]:
    """The files a model needs to load: one weight format, no other frameworks' copies.

    ``allow_patterns`` / ``ignore_patterns`` (fnmatch, as huggingface_hub uses them) take
    precedence over the defaults. Pickled weights need ``allow_pickle``.
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
    pickled = [f.path for f in chosen if _matches(f.path, PICKLE_WEIGHT_PATTERNS)]
    if pickled and not allow_pickle:
        raise InvalidRequest(
            f"This repository offers only pickled weights ({', '.join(pickled[:3])}), which can "
            'run code when loaded. Set "allow_pickle": true to install them (they will be '
            "loaded with weights_only=True), or pick a repository with safetensors weights",
            error="Pickled weights need opt-in",
        )
    return chosen


def _hub_error(exc: Exception, repo_id: str, revision: str, endpoint: str) -> ModelhostError:
    """A Hub error as a message a user can act on."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError):
        return UpstreamDenied(
            f"{repo_id} is gated on {endpoint}: accept its terms on the Hub with your account "
            "and set HF_TOKEN to a token of that account",
            error="Gated repository",
        )
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return UpstreamDenied(
            f"{endpoint} refused access to {repo_id} ({status}): it is private or gated; "
            "set HF_TOKEN to a token that can read it",
            error=f"Hub answered {status}",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return UpstreamNotFound(
            f"Repository {repo_id} not found on {endpoint} (if it is private, set HF_TOKEN)",
            error="Repository not found",
        )
    if isinstance(exc, RevisionNotFoundError):
        return UpstreamNotFound(
            f"Revision {revision!r} not found in {repo_id}: use a branch, tag or commit that "
            "exists",
            error="Revision not found",
        )
    if isinstance(exc, HFValidationError):
        return InvalidRequest(f"Invalid repository id or revision: {exc}")
    if isinstance(exc, HfHubHTTPError):
        return UpstreamError(f"The Hub failed for {repo_id}: {exc}")
    return UpstreamError(f"Cannot reach {endpoint} for {repo_id}: {exc}")


def check_repo_id(repo_id: str, what: str = "model_id") -> str:
    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise InvalidRequest(
            f"Invalid {what} {repo_id!r}: use a Hugging Face repository id like "
            "'microsoft/speecht5_tts'",
            error="Invalid repository id",
        )
    return repo_id


class HuggingFaceSource:
    name = "huggingface"

    def plan(self, request: DownloadRequest, context: SourceContext) -> Plan:
        """Resolve the revision to a commit, list and select files, add the vocoder if asked."""
        hub = context.hub
        if hub is None:
            raise InvalidRequest("The Hugging Face source is not configured")
        repo_id = check_repo_id(request.model_id)
        main = self.snapshot(hub, repo_id, request.revision or "main", request)
        specs = self._specs(hub, main, prefix="")
        config = self._read_config(context, specs)
        architecture = config.get("model_type") if config else None

        entry = entry_for_model_id(load_catalog(), repo_id)
        components = []
        vocoder_id = None
        if request.include_vocoder:
            vocoder_id = (
                request.vocoder_model
                or (entry.vocoder_model if entry else None)
                or DEFAULT_VOCODERS.get(str(architecture))
            )
            if vocoder_id is None:
                raise InvalidRequest(
                    f"No default vocoder for a {architecture or 'model of unknown type'}; "
                    "name one in 'vocoder_model', or drop include_vocoder "
                    "(Bark and VITS make audio without one)",
                    error="No vocoder for this model",
                )
            check_repo_id(vocoder_id, "vocoder_model")
            vocoder = self.snapshot(hub, vocoder_id, "main", None, request.allow_pickle)
            specs += self._specs(hub, vocoder, prefix=f"{VOCODER_DIR}/")
            components.append(
                {
                    "role": "vocoder",
                    "repo_id": vocoder_id,
                    "revision": vocoder.commit,
                    "path": VOCODER_DIR,
                }
            )

        is_tts = request.task in TTS_TASKS or architecture in TTS_ARCHITECTURES
        notes = []
        if request.auto_convert_tts and architecture not in TTS_ARCHITECTURES:
            # Never pretend: a text model's output is not audio.
            kind = architecture or "unknown architecture"
            head = f"auto_convert_tts: {repo_id} ({kind}) has no speech head"
            if request.speak_with:
                notes.append(
                    f"{head}; /synthesize will generate text with it and speak that text with "
                    f"'{request.speak_with}' (a pipeline of two models, not a conversion)"
                )
            else:
                notes.append(
                    f"{head}, so it cannot be converted to text-to-speech; it is installed as "
                    'it is (add "speak_with": "<an installed TTS model>" for a text -> speech '
                    "pipeline)"
                )
        elif request.speak_with:
            raise InvalidRequest(
                f"{repo_id} speaks by itself: speak_with is for a text model installed with "
                "auto_convert_tts",
                error="speak_with not applicable",
            )
        return Plan(
            source=self.name,
            model_id=repo_id,
            # The seed's default task is a guess; unless the request names one, the runtime
            # reads the task from the model's own config.
            task=request.task if "task" in request.model_fields_set else None,
            files=specs,
            revision=main.commit,
            model_type="tts" if is_tts else architecture,
            description=entry.description if entry else f"{repo_id} at {main.commit[:12]}",
            extra={
                "requested_revision": main.requested_revision,
                "architecture": architecture,
                "components": components,
                "vocoder_models": [vocoder_id] if vocoder_id else [],
                "speak_with": request.speak_with,
                "supports_voice_cloning": (
                    entry.tts_features.supports_voice_cloning if entry else None
                ),
                "notes": notes,
            },
        )

    def snapshot(
        self,
        hub: HubSettings,
        repo_id: str,
        revision: str,
        request: DownloadRequest | None,
        allow_pickle: bool = False,
    ) -> RepoSnapshot:
        """The repository at ``revision``, pinned to its commit, with the files to install.

        Without a ``request`` (a component such as the vocoder) the default selection
        applies, with ``allow_pickle`` as the request that brought it along says."""
        if hub.offline:
            from modelhost.sources import hf_cache

            return hf_cache.snapshot(hub.cache_dir, repo_id, revision, request, allow_pickle)
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        try:
            commit = api.model_info(repo_id, revision=revision).sha
            entries = list(api.list_repo_tree(repo_id, revision=commit, recursive=True))
        except Exception as exc:  # huggingface_hub raises many kinds; all become ours
            raise _hub_error(exc, repo_id, revision, hub.endpoint) from exc
        if not commit:
            raise UpstreamError(f"{hub.endpoint} gave no commit for {repo_id}@{revision}")
        files = [e for e in entries if isinstance(e, RepoFile)]
        if request is not None:
            files = select_files(
                files, request.allow_patterns, request.ignore_patterns, request.allow_pickle
            )
        else:
            files = select_files(files, None, None, allow_pickle=allow_pickle)
        if not files:
            raise InvalidRequest(f"No files of {repo_id}@{revision} match the patterns given")
        return RepoSnapshot(repo_id, revision, commit, files)

    @staticmethod
    def _specs(hub: HubSettings, snapshot: RepoSnapshot, prefix: str) -> list[FileSpec]:
        if hub.offline:
            from modelhost.sources import hf_cache

            return hf_cache.specs(hub.cache_dir, snapshot, prefix)
        specs = []
        for entry in snapshot.files:
            if PurePosixPath(entry.path).name == ".gitattributes":
                continue
            local = None
            if hub.cache_dir is not None:
                folder = "models--" + snapshot.repo_id.replace("/", "--")
                candidate = hub.cache_dir / folder / "snapshots" / snapshot.commit / entry.path
                local = str(candidate) if candidate.is_file() else None
            specs.append(
                FileSpec(
                    url=hf_hub_url(
                        snapshot.repo_id,
                        entry.path,
                        revision=snapshot.commit,
                        endpoint=hub.endpoint,
                    ),
                    path=prefix + entry.path,
                    size=entry.lfs.size if entry.lfs else entry.size,
                    sha256=entry.lfs.sha256 if entry.lfs else None,
                    git_sha1=None if entry.lfs else entry.blob_id,
                    local_source=local,
                )
            )
        return specs

    @staticmethod
    def _read_config(context: SourceContext, specs: list[FileSpec]) -> dict:
        """The model's config.json (verified against its git blob id), or {} if it has none.

        A verified copy in the local huggingface_hub cache is read instead of the network.
        """
        spec = next((s for s in specs if s.path == "config.json"), None)
        if spec is None:
            return {}
        data = None
        if spec.local_source:
            local = Path(spec.local_source).read_bytes()
            if spec.git_sha1 is None or git_blob_id(local) == spec.git_sha1:
                data = local
        if data is None and is_local_only(spec):
            return {}  # offline and the cached copy does not verify: the install will fail
        if data is None:
            data = context.engine.read_small(spec.url)
            if spec.git_sha1 is not None and git_blob_id(data) != spec.git_sha1:
                raise DigestMismatch(
                    f"config.json: git blob id of the downloaded bytes is {git_blob_id(data)}, "
                    f"expected {spec.git_sha1}; nothing was installed"
                )
        try:
            return json.loads(data)
        except ValueError as exc:
            raise UpstreamError(f"{spec.url} is not valid JSON: {exc}") from exc


def git_blob_id(data: bytes) -> str:
    """The id git (and the Hub's listing) gives a file's content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
