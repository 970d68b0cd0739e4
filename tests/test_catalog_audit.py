"""The catalog tells the truth: every entry plans through its own source, every TTS entry
resolves through tts_auto to the right bundle, and every feature an entry advertises is
delivered by a real request to a server that installed it.

Stand-ins: the tiny models of tests/tiny_models.py published on the test Hub under the
catalog's real repository ids, torchvision/torchaudio files served under their real names by a
loopback mirror, and the tiny Tacotron2 registered under torchaudio's real bundle name. The
plans and code paths are the real ones; only the weights are small.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import missing
from hubserver import HubServer
from safetensors.torch import load_file
from tiny_models import HUB_REPOS

from modelhost.api.app import build_services
from modelhost.catalog import CatalogEntry, load_catalog
from modelhost.errors import InvalidRequest
from modelhost.runtime.families import canonical_task
from modelhost.runtime.wav import parse_wav
from modelhost.sources import DownloadRequest, SourceContext, get_source

HAS_TORCHAUDIO = importlib.util.find_spec("torchaudio") is not None
TACOTRON2_FILES = (
    "tacotron2_english_characters_1500_epochs_wavernn_ljspeech.pth",
    "wavernn_10k_epochs_8bits_ljspeech.pth",
)
# Catalog repositories with no stand-in in publish_all: the tiny model that plays each.
EXTRA_STANDINS = {
    "suno/bark": "bark",
    "facebook/bart-large": "bart",
    "bert-base-uncased": "bert",
    "openai/whisper-tiny": "whisper",
}
ENTRIES = load_catalog().models
TTS_ENTRIES = [e for e in ENTRIES if e.task == "text-to-speech"]


def pickled(directory: Path) -> dict[str, bytes]:
    """The files of a safetensors model directory with the weights as pytorch_model.bin."""
    files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    del files["model.safetensors"]
    buffer = io.BytesIO()
    torch.save(load_file(directory / "model.safetensors"), buffer)
    return {**files, "pytorch_model.bin": buffer.getvalue()}


@pytest.fixture(scope="module")
def hub(tiny_models):
    with HubServer() as server:
        for repo_id, name in {**HUB_REPOS, **EXTRA_STANDINS}.items():
            if repo_id == "microsoft/speecht5_hifigan":
                # The real repository publishes only pytorch_model.bin: so does its stand-in.
                server.add_repo(repo_id, pickled(tiny_models[name]))
            else:
                server.add_repo(repo_id, tiny_models[name])
        server.add_repo("Plachta/VALL-E-X", {"vallex-checkpoint.pt": b"\x80\x02" + b"\0" * 62})
        yield server


@pytest.fixture
def mirror(fileserver):
    fileserver.add("/vision/resnet50-11ad3fa6.pth", b"resnet50 stand-in")
    if HAS_TORCHAUDIO:
        from tiny_models import tacotron2_files

        for name, data in tacotron2_files(*TACOTRON2_FILES).items():
            fileserver.add(f"/audio/{name}", data)
    return fileserver


@pytest.fixture
def overrides(hub, mirror, tmp_path) -> dict:
    return {
        "hf_endpoint": hub.base_url,
        "hf_hub_cache": tmp_path / "no-cache",
        "torchvision_mirror": mirror.url("/vision"),
        "torchaudio_mirror": mirror.url("/audio"),
        "device": "cpu",
    }


@pytest.fixture
def context(overrides, tmp_path):
    from conftest import make_settings

    jobs = build_services(make_settings(tmp_path / "planner", [], **overrides)).jobs
    return SourceContext(engine=jobs.engine, hub=jobs.hub, mirrors=jobs.mirrors)


def plan_of(entry: CatalogEntry, context: SourceContext, **overrides):
    request = DownloadRequest(**{**entry.download_request(), **overrides})
    return get_source(request.source).plan(request, context)


# --------------------------------------------------------------------------- every entry plans


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_every_entry_plans_through_its_own_source(entry, context, mirror):
    if entry.source == "torchaudio" and not HAS_TORCHAUDIO:
        with pytest.raises(InvalidRequest, match=r"modelhost\[audio\]"):
            plan_of(entry, context)
        missing("torchaudio is not installed (the refusal names the extra)")
    plan = plan_of(entry, context)
    assert (plan.source, plan.model_id) == (entry.source, entry.download_request()["model_id"])
    assert canonical_task(plan.task) == canonical_task(entry.task)  # a loader serves the task
    paths = [f.path for f in plan.files]
    assert paths and all(f.size for f in plan.files)
    components = plan.spec.components
    if entry.vocoder_model:
        assert [c.repo_id for c in components if c.role == "vocoder"] == [entry.vocoder_model]
        assert any(p.startswith("vocoder/") for p in paths)
    else:
        assert not components and not any(p.startswith("vocoder/") for p in paths)
    if entry.source == "torchvision":
        assert paths == ["resnet50-11ad3fa6.pth"] and plan.files[0].sha256_prefix == "11ad3fa6"
    if entry.source == "torchaudio":
        assert paths == list(TACOTRON2_FILES)
    if entry.pickled_weights:
        # Under policy allow the catalog's opt-in is needed: without it, refused. Under
        # convert (the default) the pickled state dicts are planned for conversion instead.
        allow = dataclasses.replace(context, pickle_policy="allow")
        with pytest.raises(InvalidRequest, match="allow_pickle"):
            plan_of(entry, allow, allow_pickle=False)
        assert plan_of(entry, context, allow_pickle=False).convert


@pytest.mark.parametrize("entry", TTS_ENTRIES, ids=lambda e: e.name)
def test_each_tts_entry_resolves_through_tts_auto_to_its_bundle(entry, context):
    if entry.source == "torchaudio" and not HAS_TORCHAUDIO:
        missing("torchaudio is not installed: pip install 'modelhost[audio]'")
    for spelling in (entry.name, entry.model_id):
        request = DownloadRequest(
            source="tts_auto",
            model_id=spelling,
            name="voice",
            experimental=entry.experimental,
            allow_pickle=entry.pickled_weights,
        )
        plan = get_source("tts_auto").plan(request, context)
        direct = plan_of(entry, context)
        assert (plan.source, plan.model_id) == (entry.source, entry.model_id)
        assert plan.task == "text-to-speech"
        assert [f.path for f in plan.files] == [f.path for f in direct.files]
        assert plan.spec.catalog_name == entry.name
        assert plan.spec.loadable is (not entry.requires_custom_code)
        voices = plan.spec.speaker_embeddings
        presets = [f for f in plan.files if f.path.startswith("speaker_embeddings/")]
        if entry.tts_features.speaker_presets:
            assert presets and voices.startswith(f"{len(presets)} voice preset files")
        elif entry.tts_features.speaker_embedding_required:
            assert "packaged default" in voices
        else:
            assert voices is None


@pytest.mark.parametrize("entry", TTS_ENTRIES, ids=lambda e: e.name)
def test_tts_auto_plans_what_the_entrys_download_request_plans(entry, context):
    """Naming an entry with tts_auto and the opt-ins its download_request sends installs it
    as that request does: same source, id, task, vocoder, files and revision."""
    if entry.source == "torchaudio" and not HAS_TORCHAUDIO:
        missing("torchaudio is not installed: pip install 'modelhost[audio]'")
    wanted = entry.download_request()
    opt_ins = {f: True for f in ("experimental", "allow_pickle") if wanted.get(f)}
    request = DownloadRequest(source="tts_auto", model_id=entry.name, name="voice", **opt_ins)
    plan = get_source("tts_auto").plan(request, context)
    direct = plan_of(entry, context)
    assert (plan.source, plan.model_id, plan.task, plan.revision) == (
        direct.source,
        direct.model_id,
        direct.task,
        direct.revision,
    )
    assert plan.files == direct.files  # urls, paths, sizes and digests
    # A download-only entry's files are stored, never unpickled: tts_auto keeps its pickles
    # as they are (no conversion), where the bare huggingface request would convert them.
    # tts_auto's own additions: what it resolved from, and the notes it adds.
    own = {"notes", "catalog_name", "loadable", "speaker_embeddings", "model_type", "description"}
    mine, theirs = plan.spec.model_dump(exclude=own), direct.spec.model_dump(exclude=own)
    assert mine == theirs
    if entry.requires_custom_code:
        assert plan.convert == []
    else:
        assert plan.convert == direct.convert
    assert not any("taken from the catalog entry" in note for note in plan.spec.notes)


@pytest.mark.parametrize("entry", [e for e in TTS_ENTRIES if e.large_variant], ids=lambda e: e.name)
def test_tts_auto_large_variant_plans_the_large_entrys_download_request(entry, context):
    large = next(e for e in ENTRIES if e.name == entry.large_variant)
    request = DownloadRequest(
        source="tts_auto", model_id=entry.name, name="voice", enable_large_model=True
    )
    plan = get_source("tts_auto").plan(request, context)
    direct = plan_of(large, context)
    assert (plan.model_id, plan.task, plan.files) == (direct.model_id, direct.task, direct.files)
    assert plan.spec.catalog_name == large.name


# --------------------------------------------------------------------------- advertised features


def _synthesize(server, name: str, **body):
    return server.client.post(
        "/synthesize",
        json={"model_name": name, "text": "hello there", "max_new_tokens": 8, **body},
        headers={"accept": "application/json"},
    )


def rate_in_files(server, name: str, entry: CatalogEntry) -> int:
    """The sample rate the installed files themselves declare, read without modelhost."""
    root = server.settings.home / "models" / name

    def config(path: str) -> dict:
        return json.loads((root / path).read_text())

    if entry.source == "torchaudio":
        import torchaudio
        from safetensors.torch import load_file
        from torchaudio.models import WaveRNN
        from torchaudio.pipelines._tts.impl import _WaveRNNVocoder

        bundle = getattr(torchaudio.pipelines, entry.model_id)
        if bundle._wavernn_path is None:
            return int(bundle.get_vocoder().sample_rate)
        # The installed (converted) vocoder weights, in torchaudio's own vocoder class.
        wavernn = WaveRNN(**bundle._wavernn_params)
        stem = bundle._wavernn_path.rsplit(".", 1)[0]
        wavernn.load_state_dict(load_file(str(root / f"{stem}.safetensors")))
        return int(_WaveRNNVocoder(wavernn).sample_rate)
    model_type = config("config.json")["model_type"]
    if model_type == "speecht5":
        return int(config("vocoder/config.json")["sampling_rate"])
    if model_type == "bark":
        return int(config("generation_config.json")["sample_rate"])
    return int(config("config.json")["sampling_rate"])  # VITS


def check_supports_tts(server, name, entry, row):
    response = _synthesize(server, name, seed=1)
    assert response.status_code == 200, response.text
    audio = parse_wav(base64.b64decode(response.json()["audio_base64"]))
    assert audio.sample_rate == row["sample_rate"] == rate_in_files(server, name, entry)
    assert len(audio.samples) > 0 and float(abs(audio.samples).max()) > 0


def check_vocoder_required(server, name, entry, row):
    assert row["has_vocoder"] is True


def check_vocoder_bundled(server, name, entry, row):
    info = server.client.get(f"/models/download/{name}/info").json()
    assert entry.vocoder_model is None and not info["spec"]["components"]
    # Both weight files arrived (as their safetensors conversions, the default policy).
    assert sorted(c["original_path"] for c in info["conversions"]) == sorted(TACOTRON2_FILES)
    assert sorted(f["path"] for f in info["files"]) == sorted(
        name.rsplit(".", 1)[0] + ".safetensors" for name in TACOTRON2_FILES
    )


def check_speaker_embedding_required(server, name, entry, row):
    config = json.loads((server.settings.home / "models" / name / "config.json").read_text())
    dim = int(config["speaker_embedding_dim"])
    wrong = _synthesize(server, name, speaker=[0.1] * (dim - 1))
    assert wrong.status_code == 400 and f"expects {dim}" in wrong.json()["message"]
    voices = [_synthesize(server, name, speaker=[v] * dim) for v in (0.05, -0.05)]
    assert all(r.status_code == 200 for r in voices)
    assert voices[0].json()["audio_base64"] != voices[1].json()["audio_base64"]  # it is used


def check_speaker_presets(server, name, entry, row):
    refused = _synthesize(server, name, speaker="no_such_voice")
    assert refused.status_code == 400
    offered = refused.json()["message"].rsplit(": ", 1)[1].split(", ")
    assert offered and offered[0] != "none (this model ships no presets)"
    assert _synthesize(server, name, speaker=offered[0], seed=1).status_code == 200


def check_nonverbal_sounds(server, name, entry, row):
    """Bark reads cues such as [laughs] from the text itself: the token ids handed to the
    model must be exactly the tokenizer's ids of the text with its cues, not of a cleaned one."""
    loaded = server.server.config.app.state.services.runtime.get(name, touch=False)
    handed: list[list[int]] = []
    generate = loaded.model.generate

    def spy(*args, **kwargs):
        handed.append(kwargs["input_ids"][0].tolist())
        return generate(*args, **kwargs)

    loaded.model.generate = spy
    try:
        cue = _synthesize(server, name, text="[laughs] hello [sighs]", seed=1)
    finally:
        del loaded.model.generate
    assert cue.status_code == 200, cue.text
    tokenizer = loaded.processor.tokenizer
    with_cues = tokenizer("[laughs] hello [sighs]", add_special_tokens=False)["input_ids"]
    without = tokenizer("hello", add_special_tokens=False)["input_ids"]
    assert len(handed) == 1 and with_cues != without
    ids = [i for i in handed[0] if i != tokenizer.pad_token_id]
    assert ids[: len(with_cues)] == with_cues or ids[-len(with_cues) :] == with_cues, (
        ids,
        with_cues,
    )


check_supports_emotions = check_nonverbal_sounds  # Bark's emotion comes from the same cues


def check_requires_adaptation(server, name, entry, row):
    refused = server.client.post(
        "/models/download",
        json={"source": "tts_auto", "model_id": entry.model_id, "name": "speechless"},
    )
    assert refused.status_code == 400 and "no speech head" in refused.json()["message"]


FEATURE_CHECKS = {
    "supports_tts": check_supports_tts,
    "vocoder_required": check_vocoder_required,
    "vocoder_bundled": check_vocoder_bundled,
    "speaker_embedding_required": check_speaker_embedding_required,
    "speaker_presets": check_speaker_presets,
    "nonverbal_sounds": check_nonverbal_sounds,
    "supports_emotions": check_supports_emotions,
    "requires_adaptation": check_requires_adaptation,
}


def test_every_advertised_feature_has_a_check():
    advertised = {f for e in ENTRIES for f in e.tts_features.advertised()}
    assert advertised <= set(FEATURE_CHECKS), advertised - set(FEATURE_CHECKS)
    assert not any(e.tts_features.supports_voice_cloning for e in ENTRIES)  # nothing clones


@pytest.mark.parametrize(
    "entry", [e for e in ENTRIES if e.tts_features.advertised()], ids=lambda e: e.name
)
def test_advertised_features_are_delivered(entry, overrides, make_server, monkeypatch):
    if entry.source == "torchaudio":
        if not HAS_TORCHAUDIO:
            missing("torchaudio is not installed: pip install 'modelhost[audio]'")
        import torchaudio
        from tiny_models import tacotron2_bundle

        # The tiny Tacotron2 plays the real bundle, under its real name and file names.
        monkeypatch.setattr(
            torchaudio.pipelines, entry.model_id, tacotron2_bundle(*TACOTRON2_FILES)
        )
    server = make_server([], **overrides)
    name = None
    if entry.tts_features.supports_tts:
        answer = server.client.post(
            "/models/download",
            json={**entry.download_request(), "source": "tts_auto", "model_id": entry.name,
                  "name": "voice"},
        )  # fmt: skip
        assert answer.status_code == 202, answer.text
        status = server.wait_for(answer.json()["download_id"], timeout=180)
        assert status["status"] == "completed" and status["message"].endswith("loaded on cpu")
        name = "voice"
    rows = {r["name"]: r for r in server.client.get("/models/managed").json()["downloaded_models"]}
    for feature in entry.tts_features.advertised():
        FEATURE_CHECKS[feature](server, name, entry, rows.get(name))


# --------------------------------------------------------------------------- measured sizes


def expected_download_bytes(entry: CatalogEntry, tiny_models) -> int:
    """What an install of the entry's stand-in transfers, summed from the files themselves."""

    def tree(directory: Path) -> int:
        files = [p for p in directory.rglob("*") if p.is_file() and p.name != ".gitattributes"]
        return sum(p.stat().st_size for p in files)  # git metadata is not installed

    if entry.source == "torchvision":
        return len(b"resnet50 stand-in")
    if entry.source == "torchaudio":
        from tiny_models import tacotron2_files

        return sum(len(data) for data in tacotron2_files(*TACOTRON2_FILES).values())
    if entry.model_id == "Plachta/VALL-E-X":
        return 64
    standins = {**HUB_REPOS, **EXTRA_STANDINS}
    total = tree(tiny_models[standins[entry.model_id]])
    if entry.vocoder_model:
        total += sum(len(d) for d in pickled(tiny_models[standins[entry.vocoder_model]]).values())
    return total


def test_download_sizes_are_measured_from_the_listings_and_kept(
    make_server, overrides, hub, mirror, tiny_models
):
    server = make_server([], **overrides)
    before = server.client.get("/models/available").json()["available_models"]
    assert all(body["download_size"] is None for body in before.values())  # never measured

    measured = server.client.post("/models/available/measure")
    assert measured.status_code == 200, measured.text
    models = measured.json()["available_models"]
    for entry in ENTRIES:
        size = models[entry.name]["download_size"]
        if entry.source == "torchaudio" and not HAS_TORCHAUDIO:
            assert size["size_bytes"] is None and "modelhost[audio]" in size["error"]
            continue
        assert size["error"] is None, (entry.name, size)
        assert size["size_bytes"] == expected_download_bytes(entry, tiny_models), entry.name
        assert size["size_mb"] == round(size["size_bytes"] / 1e6, 3)
        host = mirror.host_port if entry.source in ("torchvision", "torchaudio") else None
        assert size["listed_by"] == (host or hub.base_url.split("://", 1)[1]), entry.name
    assert not [r for r in mirror.requests if r.method == "GET"]  # listings only, no bytes

    # Kept: a server on the same home answers from the record, asking no upstream.
    server.stop()
    hub_requests, mirror_requests = len(hub.requests), len(mirror.requests)
    again = make_server([], **overrides, home=server.settings.home)
    kept = again.client.get("/models/available").json()["available_models"]
    assert {n: b["download_size"] for n, b in kept.items()} == {
        n: b["download_size"] for n, b in models.items()
    }
    assert (len(hub.requests), len(mirror.requests)) == (hub_requests, mirror_requests)


def test_a_get_never_measures_and_a_foreign_page_cannot_post_it(
    make_server, overrides, hub, mirror
):
    """Measuring asks every upstream and writes catalog-sizes.json: a GET (which a page, a
    prefetcher or a crawler sends freely) refuses to, and the POST that does is refused to
    pages of other origins like every state change."""
    server = make_server([], **overrides)
    hub_requests, mirror_requests = len(hub.requests), len(mirror.requests)
    refused = server.client.get("/models/available?measure=true")
    assert refused.status_code == 400, refused.text
    assert "POST /models/available/measure" in refused.json()["message"]
    foreign = server.client.post(
        "/models/available/measure", headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403, foreign.text
    assert (len(hub.requests), len(mirror.requests)) == (hub_requests, mirror_requests)
    assert not (server.settings.home / "catalog-sizes.json").exists()


def test_an_unreachable_upstream_is_recorded_not_guessed(make_server, overrides, mirror):
    server = make_server([], **{**overrides, "hf_endpoint": "http://127.0.0.1:9"})
    models = server.client.post("/models/available/measure").json()["available_models"]
    for entry in ENTRIES:
        size = models[entry.name]["download_size"]
        if entry.source == "huggingface":
            assert size["size_bytes"] is None and size["error"], entry.name
        elif entry.source == "torchvision":
            assert size["size_bytes"] == len(b"resnet50 stand-in") and size["error"] is None
