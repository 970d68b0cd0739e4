"""What a first hour with modelhost meets, told truthfully: a requested load that fails fails
the job (the install stays), a missing Python module names its pip install, CUDA asked for
where there is none is refused before any upstream request, a retry after a cancel resumes
from the bytes it says, and a Whisper with a small decoder transcribes."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_settings
from fileserver import DropAfter, Rate
from hubserver import HubServer
from tiny_models import build_whisper
from toy_family import ToyAdapter, write_toy_model

from modelhost.api.app import build_services
from modelhost.runtime.families import FamilyInfo
from modelhost.runtime.families.base import DetectContext, LoadOptions, Parts
from modelhost.runtime.families.registry import register, unregister

SRC = Path(__file__).resolve().parent.parent / "src"
MODELHOST = Path(sys.executable).parent / "modelhost"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def run_cli(url: str, *args: str) -> subprocess.CompletedProcess:
    """``modelhost --url URL ARGS...`` as a user runs it (this tree's code, plain output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELHOST_")}
    env.update({"PYTHONPATH": str(SRC), "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    return subprocess.run(
        [str(MODELHOST), "--url", url, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def squeezenet_weights() -> bytes:
    """A real torchvision squeezenet1_1 state dict (5 MB of safetensors)."""
    import torchvision
    from safetensors.torch import save

    torch.manual_seed(0)
    return save(torchvision.models.squeezenet1_1(weights=None).state_dict())


def url_body(url: str, name: str, **extra) -> dict:
    return {"source": "url", "model_id": url, "name": name, **extra}


# --------------------------------------------------------------------------- A: load failures


def test_a_failed_load_fails_the_job_keeps_the_install_and_load_retries(
    make_server, fileserver, monkeypatch
):
    # The runtime (torch, transformers) imported before torchvision goes missing below.
    import modelhost.runtime.inference  # noqa: F401
    import modelhost.runtime.loaders  # noqa: F401

    fileserver.add("/sq.safetensors", squeezenet_weights(), faults=[Rate(4_000_000)])
    server = make_server([fileserver.host_port], device="cpu")
    body = url_body(fileserver.url("/sq.safetensors"), "sq", load_as="torchvision:squeezenet1_1")
    started = server.client.post("/models/download", json=body)
    assert started.status_code == 202, started.text
    # The install-time check has passed; torchvision goes missing before the load step.
    monkeypatch.setitem(sys.modules, "torchvision", None)

    status = server.wait_for(started.json()["download_id"])
    assert status["status"] == "failed", status
    assert status["error"] == "Missing Python package"
    assert status["message"] == (
        "Model 'sq' installed, but loading failed: Loading sq (a torchvision model) needs the "
        "Python module torchvision, which is not installed on this server: pip install "
        "torchvision (the release built for your torch), then restart the server; "
        "retry with: modelhost load sq"
    )
    info = server.client.get("/models/download/sq/info")
    assert info.status_code == 200 and info.json()["files"][0]["path"] == "sq.safetensors"

    again = server.client.post("/models/download", json=body)
    assert again.status_code == 200 and again.json()["status"] == "already_exists"
    assert again.json()["message"] == (
        "Model 'sq' is already installed (not loaded); load it with: modelhost load sq"
    )
    refused = server.client.post("/models/sq/load", json={})
    assert refused.status_code == 424, refused.text
    assert refused.json()["error"] == "Missing Python package"
    assert "pip install torchvision" in refused.json()["message"]

    monkeypatch.delitem(sys.modules, "torchvision")  # installed again: the load retries
    loaded = server.client.post("/models/sq/load", json={})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["device"] == "cpu" and loaded.json()["name"] == "sq"
    assert server.client.post("/models/download", json=body).json()["message"] == (
        "Model 'sq' already exists and is loaded on cpu"
    )
    assert fileserver.count("GET", "/sq.safetensors") == 1  # the bytes were never fetched again


def test_a_missing_module_is_refused_at_install_before_any_upstream_request(
    make_server, fileserver, monkeypatch
):
    server = make_server(
        [fileserver.host_port], torchvision_mirror=fileserver.base_url, device="cpu"
    )
    monkeypatch.setitem(sys.modules, "torchvision", None)
    source = server.client.post(
        "/models/download",
        json={"source": "torchvision", "model_id": "resnet18", "name": "r", "allow_pickle": True},
    )
    assert source.status_code == 424, source.text
    assert source.json() == {
        "success": False,
        "message": "The torchvision source needs the Python module torchvision, which is not "
        "installed on this server: pip install torchvision (the release built for your "
        "torch), then restart the server",
        "error": "Missing Python package",
    }
    as_torchvision = url_body(fileserver.url("/w.safetensors"), "w", load_as="torchvision:resnet18")
    loading = server.client.post("/models/download", json=as_torchvision)
    assert loading.status_code == 424
    assert loading.json()["message"].startswith(
        "Loading a model as torchvision:resnet18 needs the Python module torchvision"
    )
    assert fileserver.requests == []  # refused before any upstream request
    assert server.client.get("/models/downloads").json()["total"] == 0


def test_pull_exits_1_when_the_requested_load_fails(make_server, fileserver):
    from safetensors.torch import save

    fileserver.add("/odd.safetensors", save({"weight": torch.zeros(2, 2)}))
    server = make_server([fileserver.host_port], device="cpu")
    url = fileserver.url("/odd.safetensors")
    result = run_cli(
        server.base_url, "pull", f"url:{url}", "--name", "odd", "--load-as", "torchvision:resnet18"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed  Model 'odd' installed, but loading failed: " in result.stderr
    assert "; retry with: modelhost load odd" in result.stderr
    assert server.client.get("/models/download/odd/info").status_code == 200
    again = run_cli(server.base_url, "load", "odd")
    assert again.returncode == 1
    assert "does not fit torchvision's resnet18" in again.stdout + again.stderr


class UpsideDown(Exception):
    """What no loader maps to a typed error: the lifecycle's catch-all must type it."""


class BrokenToyAdapter(ToyAdapter):
    """The toy family, needing sentence-transformers, then failing in an untyped way."""

    name = "toy-broken"

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        if ctx.config.get("model_type") != "toy-broken":
            return None
        return ctx.info(self.name, "doubling")

    def load(self, info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
        import sentence_transformers  # noqa: F401 - what this family needs

        raise UpsideDown("the weights are upside down")


@pytest.fixture
def broken_family():
    register(BrokenToyAdapter())
    yield
    unregister("toy-broken")


def test_load_failures_answer_typed_4xx_never_500(
    broken_family, make_server, tmp_path, monkeypatch
):
    # broken_family first: the family stays registered until the server has stopped
    root = tmp_path / "imports"
    path = write_toy_model(root / "broken")
    (path / "config.json").write_text(json.dumps({"model_type": "toy-broken"}))
    server = make_server([], import_roots=(root,), device="cpu")
    started = server.client.post(
        "/models/download", json={"source": "local", "model_id": str(path), "name": "b"}
    )
    status = server.wait_for(started.json()["download_id"], timeout=60)
    assert status["status"] == "failed" and status["error"] == "Load failed", status
    assert status["message"] == (
        "Model 'b' installed, but loading failed: Loading model 'b' failed: UpsideDown: the "
        "weights are upside down; retry with: modelhost load b"
    )

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import now fails
    missing = server.client.post("/models/b/load", json={})
    assert missing.status_code == 424, missing.text
    assert missing.json() == {
        "success": False,
        "message": "Loading model 'b' needs the Python module sentence_transformers, which is "
        "not installed on this server: pip install sentence-transformers, then restart the "
        "server",
        "error": "Missing Python package",
    }
    monkeypatch.delitem(sys.modules, "sentence_transformers")
    broken = server.client.post("/models/b/load", json={})
    assert broken.status_code == 422, broken.text
    assert broken.json()["error"] == "Load failed"
    assert "Internal server error" not in broken.text


# --------------------------------------------------------------------------- B: no CUDA


@no_cuda
def test_device_cuda_is_refused_before_any_hub_request(make_server, tmp_path):
    with HubServer() as hub:
        hub.add_repo("org/tiny", {"config.json": b"{}", "model.safetensors": b"\0" * 64})
        server = make_server(
            [], hf_endpoint=hub.base_url, hf_hub_cache=tmp_path / "hf", device="cpu"
        )
        for device in ("cuda", "cuda:1"):
            body = {"source": "huggingface", "model_id": "org/tiny", "name": "t", "device": device}
            refused = server.client.post("/models/download", json=body)
            assert refused.status_code == 409, refused.text  # a well-formed device it lacks
            message = refused.json()["message"]
            assert message.startswith("CUDA is not available on this server: ")
            assert f"; use device cpu or auto (device '{device}' was asked for; " in message
            assert refused.json()["error"] == "Device not available"
        pulled = run_cli(server.base_url, "pull", "huggingface:org/tiny", "--device", "cuda")
        assert pulled.returncode == 1
        assert "CUDA is not available on this server: " in pulled.stdout + pulled.stderr
        assert len(hub.requests) == 0  # not even the model's metadata was asked for
        assert server.client.get("/models/downloads").json()["total"] == 0

        load = server.client.post("/models/t/load", json={"device": "cuda"})
        assert load.status_code == 409
        assert load.json()["message"].startswith("CUDA is not available on this server: ")


# --------------------------------------------------------------------------- D: retry truth

SIZE = 3_000_000


def test_a_retry_after_a_cancel_resumes_from_the_bytes_it_names(make_server, fileserver):
    payload = os.urandom(SIZE)
    fileserver.add("/big.safetensors", payload, faults=[Rate(1_000_000, times=1)])
    server = make_server([fileserver.host_port], fetch_connections=1)
    body = url_body(fileserver.url("/big.safetensors"), "big")
    job = server.client.post("/models/download", json=body).json()["download_id"]
    deadline = time.monotonic() + 30
    while server.client.get(f"/models/download/status/{job}").json()["bytes_downloaded"] < SIZE / 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelled = server.client.post(f"/models/download/{job}/cancel").json()
    assert cancelled["status"] == "cancelled"
    kept = int(re.search(r"; (\d+) bytes already fetched are kept", cancelled["message"])[1])
    assert SIZE / 3 <= kept < SIZE
    assert server.client.get("/models/cache/info").json()["partial_bytes"] == kept
    sent_before = fileserver.bytes_sent("/big.safetensors")

    retried = server.client.post(
        "/models/manage", params={"action": "retry_download", "model_name": "big"}
    ).json()
    assert (
        retried["message"]
        == f"Retrying download of 'big', resuming from {kept} bytes already fetched"
    )
    assert retried["resumed_bytes"] == kept
    assert server.wait_for(retried["download_id"])["status"] == "completed"
    # What the message said: the server sent only the rest of the file after the retry.
    assert fileserver.bytes_sent("/big.safetensors") - sent_before == SIZE - kept
    assert fileserver.requests[-1].range_start == kept
    info = server.client.get("/models/download/big/info").json()
    assert info["total_size_bytes"] == SIZE


def test_a_retry_with_nothing_to_resume_says_it_starts_over(make_server, fileserver):
    payload = os.urandom(300_000)
    fileserver.add("/s.safetensors", payload, faults=[DropAfter(100_000)])
    server = make_server([fileserver.host_port], fetch_retries=0)
    job = server.client.post(
        "/models/download", json=url_body(fileserver.url("/s.safetensors"), "s")
    ).json()["download_id"]
    assert server.wait_for(job)["status"] == "failed"
    removed = server.client.delete("/models/download/s").json()["partial_bytes_removed"]
    assert removed == 100_000
    sent_before = fileserver.bytes_sent("/s.safetensors")
    retried = server.client.post(
        "/models/manage", params={"action": "retry_download", "model_name": "s"}
    ).json()
    assert retried["message"] == (
        "Retrying download of 's', starting over from byte 0: no partial bytes of it to resume"
    )
    assert retried["resumed_bytes"] == 0
    assert server.wait_for(retried["download_id"])["status"] == "completed"
    assert fileserver.bytes_sent("/s.safetensors") - sent_before == len(payload)


def test_kept_partials_of_a_cancel_expire(make_server, fileserver):
    import asyncio

    fileserver.add("/e.safetensors", os.urandom(SIZE), faults=[Rate(1_000_000, times=1)])
    server = make_server([fileserver.host_port], fetch_connections=1)
    job = server.client.post(
        "/models/download", json=url_body(fileserver.url("/e.safetensors"), "e")
    ).json()["download_id"]
    time.sleep(0.6)
    server.client.post(f"/models/download/{job}/cancel")
    kept = server.client.get("/models/cache/info").json()["partial_bytes"]
    assert kept > 0
    server.stop()

    jobs = build_services(make_settings(server.settings.home, [fileserver.host_port])).jobs
    assert asyncio.run(jobs.expire_cancelled_partials()) == 0  # kept for a day
    jobs.cancelled_partials_keep_s = 0.0
    assert asyncio.run(jobs.expire_cancelled_partials()) == kept
    assert not list((server.settings.home / "partial").glob("*.part"))
    jobs.repository.close()


# --------------------------------------------------------------------------- E: Whisper


def wav_bytes(seconds: float = 1.0, rate: int = 16_000) -> bytes:
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def test_a_whisper_with_64_decoder_positions_transcribes(make_server, tmp_path):
    root = tmp_path / "imports"
    path = build_whisper(root / "small-whisper")
    config = json.loads((path / "config.json").read_text())
    assert config["max_target_positions"] == 64
    # No length in its generation config: the pipeline's default of 256 new tokens applies.
    generation = json.loads((path / "generation_config.json").read_text())
    generation.pop("max_length", None)
    (path / "generation_config.json").write_text(json.dumps(generation))

    server = make_server([], import_roots=(root,), device="cpu")
    started = server.client.post(
        "/models/download",
        json={
            "source": "local",
            "model_id": str(path),
            "name": "sw",
            "task": "automatic-speech-recognition",
        },
    )
    assert started.status_code == 202, started.text
    assert server.wait_for(started.json()["download_id"], timeout=180)["status"] == "completed"

    answer = server.client.post(
        "/v1/audio/transcriptions",
        data={"model": "sw", "response_format": "verbose_json"},
        files={"file": ("tone.wav", wav_bytes(), "audio/wav")},
    )
    assert answer.status_code == 200, answer.text
    assert isinstance(answer.json()["text"], str) and answer.json()["duration"] == pytest.approx(
        1.0
    )
    samples = np.zeros(16_000, dtype=np.float32).tolist()
    predicted = server.client.post(
        "/models/sw/predict",
        json={"inputs": {"samples": samples, "sampling_rate": 16_000}},
    )
    assert predicted.status_code == 200, predicted.text
    too_many = server.client.post(
        "/models/sw/predict",
        json={
            "inputs": {"samples": samples, "sampling_rate": 16_000},
            "parameters": {"max_new_tokens": 61},
        },
    )
    assert too_many.status_code == 400  # 64 positions less 4 start tokens: at most 60
    assert too_many.json()["message"] == "parameter max_new_tokens must be an integer from 1 to 60"
