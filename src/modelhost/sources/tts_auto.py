"""The ``tts_auto`` source: a TTS name or id resolved through the catalog to a concrete plan.

``speecht5``, ``microsoft/speecht5_tts``, ``bark``, ``bark-small``, ``mms-tts-eng``,
``tacotron2``, ``vall-e-x``... name a catalog entry; the entry says which source, model id
and vocoder make it speak, and the concrete source plans the whole bundle as one model.
"""

from __future__ import annotations

import difflib
from dataclasses import replace

from modelhost.catalog import CatalogEntry, is_tts_task, load_catalog
from modelhost.errors import InvalidRequest, ModelNotFound
from modelhost.sources.base import DownloadRequest, Plan, SourceContext
from modelhost.sources.gates import require_opt_ins
from modelhost.sources.registry import concrete_source


def _key(text: str) -> str:
    key = text.strip().lower().replace("-", "_").replace(" ", "_")
    return key.removesuffix("_tts")


def tts_aliases() -> dict[str, CatalogEntry]:
    """Every accepted spelling (catalog name, model id, short name) -> its TTS entry."""
    aliases: dict[str, CatalogEntry] = {}
    for entry in load_catalog().models:
        if not is_tts_task(entry.task):
            continue
        short = entry.model_id.rsplit("/", 1)[-1]
        for spelling in (entry.name, entry.model_id, short):
            aliases.setdefault(_key(spelling), entry)
    return aliases


def resolve(model_id: str) -> CatalogEntry:
    """The catalog entry ``model_id`` names; 404 with close matches when there is none."""
    aliases = tts_aliases()
    key = _key(model_id)
    if key in aliases:
        return aliases[key]
    entry = next(
        (e for e in load_catalog().models if _key(e.name) == key or _key(e.model_id) == key), None
    )
    if entry is not None:  # in the catalog, but it cannot speak
        raise InvalidRequest(
            f"{entry.model_id} is a {entry.task} model with no speech head: tts_auto installs "
            "text-to-speech models only",
            error="Not a TTS model",
        )
    close = difflib.get_close_matches(key, list(aliases), n=5, cutoff=0.5)
    raise ModelNotFound(
        f"No TTS model called {model_id!r} in the catalog"
        + (f"; close matches: {', '.join(close)}" if close else "")
        + f". Known: {', '.join(sorted({e.name for e in aliases.values()}))}",
        error="Unknown TTS model",
    )


def speaker_embeddings(entry: CatalogEntry, plan: Plan) -> str | None:
    """Where the bundle's voices come from, read from the planned files and the entry."""
    presets = [f.path for f in plan.files if f.path.startswith("speaker_embeddings/")]
    if presets:
        return (
            f"{len(presets)} voice preset files from the repository (speaker_embeddings/); "
            'pass "speaker": "<preset name>" to /synthesize'
        )
    if entry.tts_features.speaker_embedding_required:
        return (
            "none published with the model: /synthesize uses a packaged default (a fixed "
            'seeded x-vector, not a recorded voice); pass "speaker": [floats] for a real one'
        )
    return None  # the model speaks with its own voice(s)


def entry_fields(entry: CatalogEntry) -> dict:
    """The fields of the entry's own ``download_request`` that the concrete request takes:
    what the entry needs to speak (source, id, task, vocoder). Never its opt-ins
    (``experimental``, ``allow_pickle``): those stay the user's to give, so the catalog's
    gates hold through ``tts_auto`` as they do when the concrete source is named."""
    wanted = entry.download_request()
    return {
        "source": wanted["source"],
        "model_id": wanted["model_id"],
        "task": wanted["task"],
        "include_vocoder": wanted.get("include_vocoder", False),
        "vocoder_model": wanted.get("vocoder_model"),
    }


class TtsAutoSource:
    name = "tts_auto"

    def plan(self, request: DownloadRequest, context: SourceContext) -> Plan:
        """Resolve the name, apply the flags, and let the entry's own source plan it."""
        entry = resolve(request.model_id)
        notes = []
        if request.enable_large_model:
            if entry.large_variant:
                large = next(e for e in load_catalog().models if e.name == entry.large_variant)
                notes.append(
                    f"enable_large_model: using {large.model_id} instead of {entry.model_id}"
                )
                entry = large
            else:
                notes.append(f"enable_large_model ignored: {entry.name} has no larger variant")
        concrete = request.model_copy(update=entry_fields(entry))
        require_opt_ins(concrete, entry)
        loadable = not entry.requires_custom_code
        if not loadable:
            notes.append(
                f"{entry.model_id} needs its authors' own code, which modelhost never runs: "
                "it is installed download-only (loadable: false)"
            )
        if not loadable and context.pickle_policy == "convert":
            # Download-only files are stored, never unpickled: converting them buys nothing
            # (they are often not plain state dicts), so their pickles keep needing opt-in.
            context = replace(context, pickle_policy="allow")
        plan = concrete_source(entry.source).plan(concrete, context)
        return replace(
            plan,
            spec=plan.spec.model_copy(
                update={
                    "model_type": "tts",
                    "description": f"{entry.description} (resolved from {request.model_id!r})",
                    "catalog_name": entry.name,
                    "loadable": loadable,
                    "notes": notes,
                    "speaker_embeddings": speaker_embeddings(entry, plan),
                }
            ),
        )
