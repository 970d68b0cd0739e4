"""The ``huggingface`` source: a Hub repository, pinned to a commit, as a list of files.

Metadata comes from the Hub's API through modelhost's own client (``hub_api``: revision,
file listing with sizes, LFS sha256 and git blob ids; ``HF_ENDPOINT`` and ``HF_TOKEN``
honoured), the bytes through the fetch engine: both under the same allow-list, timeouts and
cancellation, so resume, verification and progress apply to every file. A TTS model may
bring its vocoder along as a component of the same logical model.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

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
from modelhost.names import check_path_limits
from modelhost.sources import hf_cache
from modelhost.sources.base import DownloadRequest, PicklePolicy, Plan, SourceContext
from modelhost.sources.hf_select import RepoSnapshot, select_for_request, to_convert
from modelhost.sources.hf_select import select_files as select_files  # re-exported (tests)
from modelhost.sources.hub_api import HubApi, HubResponseError, resolve_url
from modelhost.spec import Component, ModelSpec

REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

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


def _hub_error(exc: HubResponseError, repo_id: str, revision: str, endpoint: str) -> ModelhostError:
    """A Hub error answer (status and ``X-Error-Code``) as a message a user can act on."""
    status, code = exc.status, exc.code
    if code == "GatedRepo":
        return UpstreamDenied(
            f"{repo_id} is gated on {endpoint}: accept its terms on the Hub with your account "
            "and set HF_TOKEN to a token of that account",
            error="Gated repository",
        )
    if status in (401, 403):
        return UpstreamDenied(
            f"{endpoint} refused access to {repo_id} ({status}): it is private or gated; "
            "set HF_TOKEN to a token that can read it",
            error=f"Hub answered {status}",
        )
    if code == "RepoNotFound":
        return UpstreamNotFound(
            f"Repository {repo_id} not found on {endpoint} (if it is private, set HF_TOKEN)",
            error="Repository not found",
        )
    if code == "RevisionNotFound":
        return UpstreamNotFound(
            f"Revision {revision!r} not found in {repo_id}: use a branch, tag or commit that "
            "exists",
            error="Revision not found",
        )
    if code == "EntryNotFound":
        return UpstreamNotFound(
            f"{endpoint} has no such entry in {repo_id}@{revision} ({exc.url})",
            error="Entry not found",
        )
    if status in (404, 410):
        return UpstreamNotFound(
            f"{repo_id}@{revision} not found: {exc.url} answered {status} without saying "
            "what is missing (is HF_ENDPOINT a Hugging Face Hub?)",
            error="Not found upstream",
        )
    if status == 400:
        return InvalidRequest(
            f"{endpoint} refused {repo_id}@{revision} as invalid: {exc.detail or 'no detail'}",
            error="Invalid repository id or revision",
        )
    return UpstreamError(f"The Hub failed for {repo_id}: {exc.message}", error=exc.error)


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
        # Offline, nothing is asked of the Hub: the snapshot comes from HF_HUB_CACHE.
        api = None if hub.offline else HubApi(context.engine, hub.endpoint, context.cancel)
        main = self.snapshot(
            hub,
            api,
            repo_id,
            request.revision or "main",
            request,
            pickle_policy=context.pickle_policy,
        )
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
            vocoder = self.snapshot(
                hub, api, vocoder_id, "main", None, request.allow_pickle, context.pickle_policy
            )
            specs += self._specs(hub, vocoder, prefix=f"{VOCODER_DIR}/")
            components.append(
                Component(
                    role="vocoder",
                    repo_id=vocoder_id,
                    revision=vocoder.commit,
                    path=VOCODER_DIR,
                )
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
            # The API's default task is a guess; unless the request names one, the runtime
            # reads the task from the model's own config.
            task=request.task if "task" in request.model_fields_set else None,
            files=specs,
            revision=main.commit,
            spec=ModelSpec(
                model_type="tts" if is_tts else architecture,
                description=entry.description if entry else f"{repo_id} at {main.commit[:12]}",
                requested_revision=main.requested_revision,
                architecture=architecture,
                components=components,
                vocoder_models=[vocoder_id] if vocoder_id else [],
                speak_with=request.speak_with,
                supports_voice_cloning=(
                    entry.tts_features.supports_voice_cloning if entry else None
                ),
                notes=notes,
            ),
            convert=to_convert(specs, context.pickle_policy, request.allow_pickle),
        )

    def snapshot(
        self,
        hub: HubSettings,
        api: HubApi | None,
        repo_id: str,
        revision: str,
        request: DownloadRequest | None,
        allow_pickle: bool = False,
        pickle_policy: PicklePolicy = "convert",
    ) -> RepoSnapshot:
        """The repository at ``revision``, pinned to its commit, with the files to install.

        Without a ``request`` (a component such as the vocoder) the default selection
        applies, with ``allow_pickle`` as the request that brought it along says."""
        if api is None:  # offline
            return hf_cache.snapshot(
                hub.cache_dir, repo_id, revision, request, allow_pickle, pickle_policy
            )
        try:
            commit = api.commit(repo_id, revision)
            files = api.list_files(repo_id, commit)
        except HubResponseError as exc:
            raise _hub_error(exc, repo_id, revision, api.endpoint) from exc
        files = select_for_request(files, request, allow_pickle, pickle_policy)
        if not files:
            raise InvalidRequest(f"No files of {repo_id}@{revision} match the patterns given")
        return RepoSnapshot(repo_id, revision, commit, files)

    @staticmethod
    def _specs(hub: HubSettings, snapshot: RepoSnapshot, prefix: str) -> list[FileSpec]:
        if hub.offline:
            return hf_cache.specs(hub.cache_dir, snapshot, prefix)
        specs = []
        for entry in snapshot.files:
            if PurePosixPath(entry.path).name == ".gitattributes":
                continue
            # Before the path touches the filesystem (the cache lookup below): a name over
            # the limits must be refused with a message, not fail as an OSError.
            check_path_limits(prefix + entry.path)
            local = None
            if hub.cache_dir is not None:
                folder = "models--" + snapshot.repo_id.replace("/", "--")
                candidate = hub.cache_dir / folder / "snapshots" / snapshot.commit / entry.path
                local = str(candidate) if candidate.is_file() else None
            specs.append(
                FileSpec(
                    url=resolve_url(hub.endpoint, snapshot.repo_id, entry.path, snapshot.commit),
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
            data = context.engine.read_small(spec.url, cancel=context.cancel)
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
