"""The typed ModelSpec: what a source learns, kept in the manifest, read back by everyone.

Manifests and job plans written before specs were typed (an ``extra`` dict) still load:
the fixtures under tests/fixtures/ were written by that version's own code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from modelhost.errors import Conflict
from modelhost.jobs.manager import plan_from_dict, plan_to_dict
from modelhost.sources import DownloadRequest
from modelhost.store import Manifest, Store

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY_MANIFEST = FIXTURES / "manifest_v1_speecht5.json"
LEGACY_PLAN = FIXTURES / "plan_v1_torch_hub.json"


def test_a_manifest_in_the_old_format_loads_into_a_typed_spec():
    from modelhost.spec import Component, InstallOptions

    assert "extra" in json.loads(LEGACY_MANIFEST.read_text())  # the fixture is the old shape
    manifest = Manifest.model_validate_json(LEGACY_MANIFEST.read_bytes())
    spec = manifest.spec
    assert spec.model_type == "tts" and spec.architecture == "speecht5"
    assert spec.description == "SpeechT5 (resolved from 'speecht5')"
    assert spec.components == [
        Component(
            role="vocoder", repo_id="microsoft/speecht5_hifigan", revision="b" * 40, path="vocoder"
        )
    ]
    assert spec.vocoder_models == ["microsoft/speecht5_hifigan"]
    assert spec.catalog_name == "speecht5_tts" and spec.loadable is True
    assert spec.requested_revision == "main" and spec.supports_voice_cloning is False
    assert spec.notes == ["include_vocoder: taken from the catalog entry speecht5_tts"]
    # The old "requested" record becomes a legacy identity: only source and model id known.
    assert spec.options == InstallOptions(source="tts_auto", model_id="speecht5", legacy=True)
    assert [f.path for f in manifest.files] == ["config.json", "vocoder/model.safetensors"]


def test_the_store_reads_old_manifests_and_writes_the_new_shape_that_round_trips(tmp_path):
    store = Store(tmp_path / "home")
    (store.manifests_dir / "voice.json").write_bytes(LEGACY_MANIFEST.read_bytes())
    manifest = store.get("voice")
    assert manifest is not None and manifest.spec.catalog_name == "speecht5_tts"
    assert [m.name for m in store.list()] == ["voice"]
    written = json.loads(manifest.model_dump_json())
    assert "extra" not in written and written["spec"]["architecture"] == "speecht5"
    assert Manifest.model_validate(written) == manifest


def test_the_spec_refuses_undeclared_keys():
    from modelhost.spec import ModelSpec

    with pytest.raises(ValidationError, match="load_ass"):
        ModelSpec.model_validate({"load_ass": "torchscript"})
    # Only the migration drops keys it no longer knows (e.g. a dropped "weights_url").
    assert ModelSpec.from_legacy({"load_as": "torchscript", "weights_url": "x"}).load_as == (
        "torchscript"
    )


def test_an_old_job_plan_still_resumes_with_its_archive_conversions_and_changes():
    data = json.loads(LEGACY_PLAN.read_text())
    assert "extra" in data  # the old shape
    plan = plan_from_dict(data)
    assert plan.archive == "zip" and plan.convert == ["weights.pth"]
    assert plan.spec.load_as == "torch_hub:resnet18" and plan.spec.repo == "pytorch/vision"
    assert plan.spec.target == ("torch_hub", "resnet18")
    assert plan.model_type == "torch_hub"
    assert plan.description == "resnet18 from pytorch/vision at v0.10.0"
    assert plan.changes is not None and plan.changes.added == ["a"]
    assert plan.changes.unchanged == 2
    assert [f.path for f in plan.files] == ["vision-v0.10.0.zip"]
    # Stored again, it is in the new shape, and reads back the same.
    stored = json.loads(json.dumps(plan_to_dict(plan)))
    assert "extra" not in stored and stored["spec"]["load_as"] == "torch_hub:resnet18"
    assert plan_from_dict(stored) == plan


def test_a_legacy_identity_compares_source_and_model_id_only():
    from modelhost.jobs.manager import check_same_identity

    manifest = Manifest.model_validate_json(LEGACY_MANIFEST.read_bytes())
    same = DownloadRequest(source="tts_auto", model_id="speecht5", name="voice", load=False)
    check_same_identity(manifest, same)  # no raise: already_exists
    # As resolved: the concrete repository, as the old check accepted.
    concrete = DownloadRequest(
        source="huggingface", model_id="microsoft/speecht5_tts", name="voice"
    )
    check_same_identity(manifest, concrete)
    other = DownloadRequest(source="tts_auto", model_id="bark-small", name="voice")
    with pytest.raises(Conflict, match="A different model is already installed as 'voice'"):
        check_same_identity(manifest, other)


# --------------------------------------------------------------- install decisions remembered


@pytest.fixture
def torchscript_file(fileserver, tmp_path):
    import torch

    torch.manual_seed(0)
    module = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh()))
    archive = tmp_path / "tiny.pt"
    torch.jit.save(module, str(archive))
    fileserver.add("/tiny.pt", archive.read_bytes())
    return module


def test_a_torchscript_file_records_what_it_loads_as_and_reloads_without_repeats(
    make_server, fileserver, torchscript_file
):
    import torch

    server = make_server([fileserver.host_port], device="cpu")
    request = {
        "source": "url",
        "model_id": fileserver.url("/tiny.pt"),
        "name": "ts",
        "load_as": "torchscript",
        "allow_pickle": True,
    }
    job = server.client.post("/models/download", json=request).json()
    assert server.wait_for(job["download_id"])["status"] == "completed"
    info = server.client.get("/models/download/ts/info").json()
    # Sent without a task: it is a TorchScript module (tensors in, tensors out), not the
    # seed's default text-generation.
    assert info["task"] == "tensor"
    assert info["spec"]["load_as"] == "torchscript" and info["spec"]["loadable"] is True
    assert info["spec"]["options"]["allow_pickle"] is True
    assert server.client.post("/models/ts/unload").status_code == 200
    # Loading again needs neither allow_pickle nor load_as repeated.
    again = server.client.post("/models/ts/load")
    assert again.status_code == 200, again.text
    inputs = [[0.5, -1.0, 2.0, 0.0]]
    answer = server.client.post("/models/ts/predict", json={"inputs": inputs}).json()
    expected = torchscript_file(torch.tensor(inputs)).tolist()
    assert max(abs(a - b) for a, b in zip(answer["outputs"][0], expected[0], strict=True)) < 1e-6


def test_a_bare_weights_file_is_download_only_and_predict_does_not_suggest_load(
    make_server, fileserver
):
    fileserver.add("/w.safetensors", b"\0" * 64)
    server = make_server([fileserver.host_port], device="cpu")
    body = {"source": "url", "model_id": fileserver.url("/w.safetensors"), "name": "bare"}
    job = server.client.post("/models/download", json=body).json()
    assert server.wait_for(job["download_id"])["status"] == "completed"
    info = server.client.get("/models/download/bare/info").json()
    assert info["spec"]["loadable"] is False and info["spec"]["load_as"] is None
    assert info["task"] is None  # nothing to serve a task with
    answer = server.client.post("/models/bare/predict", json={"inputs": "hello"})
    # Loading cannot succeed, so the answer says why instead of "POST /models/bare/load".
    assert answer.status_code == 400, answer.text
    message = answer.json()["message"]
    assert "stored download-only" in message and "bare weights file" in message
    assert "/load" not in message


def test_a_job_row_stored_by_the_old_version_resumes_after_an_upgrade(
    make_server, fileserver, tmp_path
):
    from modelhost.jobs.db import JobRepository
    from modelhost.jobs.models import Job, JobState

    content = b"\7" * 2048
    fileserver.add("/old.safetensors", content)
    url = fileserver.url("/old.safetensors")
    home = tmp_path / "home"
    # The plan exactly as the old version's plan_to_dict stored it (dataclasses.asdict).
    old_plan = {
        "source": "url",
        "model_id": url,
        "task": "text-generation",
        "files": [
            {
                "url": url,
                "path": "old.safetensors",
                "size": len(content),
                "sha256": None,
                "git_sha1": None,
                "sha256_prefix": None,
                "local_source": None,
            }
        ],
        "revision": None,
        "model_type": None,
        "description": "old.safetensors from 127.0.0.1",
        "extra": {"convert": []},
    }
    repository = JobRepository(f"sqlite:///{home / 'state.db'}")
    request = {"source": "url", "model_id": url, "name": "old"}
    repository.insert(
        Job(
            id="0123456789ab",
            key="k" * 32,
            name="old",
            source="url",
            model_id=url,
            state=JobState.DOWNLOADING,
            message="Downloading",
            request=request,
            plan=old_plan,
            bytes_total=len(content),
        )
    )
    repository.close()
    server = make_server([fileserver.host_port], home=home)
    status = server.wait_for("0123456789ab")
    assert status["status"] == "completed", status
    info = server.client.get("/models/download/old/info").json()
    assert info["spec"]["description"] == "old.safetensors from 127.0.0.1"
    assert [f["size"] for f in info["files"]] == [len(content)]


def test_the_request_that_installs_a_model_again_comes_from_its_options():
    from modelhost.jobs.manager import request_of
    from modelhost.spec import InstallOptions, ModelSpec

    options = InstallOptions(
        source="url",
        model_id="http://127.0.0.1:1/tiny.pt",
        task="text-generation",
        load_as="torchscript",
        allow_pickle=True,
    )
    manifest = Manifest(
        name="ts", source="url", model_id=options.model_id, spec=ModelSpec(options=options)
    )
    request = request_of(manifest)
    assert (request.load_as, request.allow_pickle, request.name) == ("torchscript", True, "ts")
    assert "task" not in request.model_fields_set  # the default stays a default
    legacy = Manifest.model_validate_json(LEGACY_MANIFEST.read_bytes())
    again = request_of(legacy)
    assert (again.source, again.model_id, again.task) == (
        "huggingface",
        "microsoft/speecht5_tts",
        "text-to-speech",
    )
