"""The local source: a directory under MODELHOST_IMPORT_ROOTS imported like a download."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from modelhost.config import Settings


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def roots(tmp_path, tiny_models) -> Path:
    """An import root holding a copy of the tiny BERT."""
    root = tmp_path / "imports"
    shutil.copytree(tiny_models["bert"], root / "bert")
    return root


def post(server, model_id: str, name: str = "bert", **extra):
    return server.client.post(
        "/models/download", json={"source": "local", "model_id": model_id, "name": name, **extra}
    )


def assert_nothing_recorded(server) -> None:
    assert server.client.get("/models/cache/info").json()["total_models"] == 0
    assert server.client.get("/models/downloads").json()["downloads"] == []


def test_import_inside_the_roots_stores_verified_files_and_loads(make_server, roots):
    server = make_server([], import_roots=(roots,))
    started = post(server, str(roots / "bert"))
    assert started.status_code == 202, started.text
    assert started.json()["status"] in ("pending", "downloading")
    status = server.wait_for(started.json()["download_id"], timeout=120)
    assert status["status"] == "completed", status
    assert "loaded on cpu" in status["message"]

    info = server.client.get("/models/download/bert/info").json()
    originals = {
        p.relative_to(roots / "bert").as_posix(): sha256_of(p)
        for p in (roots / "bert").rglob("*")
        if p.is_file()
    }
    assert {f["path"]: f["sha256"] for f in info["files"]} == originals
    for path, digest in originals.items():
        stored = Path(info["path"]) / path
        assert sha256_of(stored) == digest
    assert info["source"] == "local"
    assert info["model_id"] == str(roots / "bert")

    prediction = server.client.post("/models/bert/predict", json={"inputs": "hello world"})
    assert prediction.status_code == 200, prediction.text
    assert abs(sum(p["score"] for p in prediction.json()["predictions"]) - 1) < 1e-5

    again = post(server, str(roots / "bert"))
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "already_exists"


def test_symlink_inside_the_root_is_followed(make_server, roots):
    os.symlink(roots / "bert" / "config.json", roots / "bert" / "config-link.json")
    server = make_server([], import_roots=(roots,))
    started = post(server, str(roots / "bert"), load=False)
    assert started.status_code == 202, started.text
    status = server.wait_for(started.json()["download_id"], timeout=60)
    assert status["status"] == "completed", status
    files = {
        f["path"]: f["sha256"]
        for f in server.client.get("/models/download/bert/info").json()["files"]
    }
    assert files["config-link.json"] == files["config.json"]


def test_no_roots_configured_is_403(make_server, roots):
    server = make_server([])
    response = post(server, str(roots / "bert"))
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["success"] is False
    assert body["error"] == "Local imports not enabled"
    assert "MODELHOST_IMPORT_ROOTS" in body["message"]
    assert_nothing_recorded(server)


def test_outside_the_roots_is_403_naming_the_setting(make_server, roots, tmp_path, tiny_models):
    server = make_server([], import_roots=(roots,))
    response = post(server, str(tiny_models["bert"]))
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["message"].startswith(f"{tiny_models['bert']} is outside the import roots")
    assert f"MODELHOST_IMPORT_ROOTS = {roots}" in body["message"]
    assert_nothing_recorded(server)


@pytest.mark.parametrize("link", ["dir", "file"])
def test_symlink_escaping_the_root_is_refused(make_server, roots, tiny_models, link):
    if link == "dir":
        os.symlink(tiny_models["bert"], roots / "escape")
        target = roots / "escape"
    else:
        os.symlink(tiny_models["bert"] / "vocab.txt", roots / "bert" / "stolen.txt")
        target = roots / "bert"
    server = make_server([], import_roots=(roots,))
    response = post(server, str(target))
    assert response.status_code == 403, response.text
    message = response.json()["message"]
    assert "is outside the import roots" in message and "(a symlink to " in message
    assert_nothing_recorded(server)


@pytest.mark.parametrize(
    "model_id, fragment, error",
    [
        ("{root}/bert/../bert", "contains '..'", "Invalid path"),
        ("bert", "must be an absolute directory path", "Invalid path"),
        ("{root}/missing", "does not exist", "No such directory"),
        ("{root}/bert/config.json", "is not a directory", "Not a directory"),
        ("{root}/empty", "holds no files to import", "Empty directory"),
    ],
)
def test_bad_paths_are_400(make_server, roots, model_id, fragment, error):
    (roots / "empty").mkdir()
    server = make_server([], import_roots=(roots,))
    response = post(server, model_id.format(root=roots))
    assert response.status_code == 400, response.text
    assert fragment in response.json()["message"]
    assert response.json()["error"] == error
    assert_nothing_recorded(server)


@pytest.fixture
def pickled_bert(roots) -> Path:
    """The tiny BERT with its weights as a pickled state dict only (pytorch_model.bin)."""
    import torch
    from safetensors.torch import load_file

    folder = roots / "bert"
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pickled_copy_beside_safetensors_is_skipped(make_server, roots):
    (roots / "bert" / "pytorch_model.bin").write_bytes(b"not really a pickle")
    server = make_server([], import_roots=(roots,))
    started = post(server, str(roots / "bert"), load=False)
    assert started.status_code == 202, started.text
    assert "pytorch_model.bin" not in started.json()["download_info"]["files"]
    assert server.wait_for(started.json()["download_id"])["status"] == "completed"
    manifest = server.client.get("/models/download/bert/info").json()
    assert "pytorch_model.bin" not in {f["path"] for f in manifest["files"]}


def test_pickled_state_dict_is_converted_by_default(make_server, roots, pickled_bert):
    server = make_server([], import_roots=(roots,))
    started = post(server, str(pickled_bert))
    assert started.status_code == 202, started.text
    status = server.wait_for(started.json()["download_id"], timeout=120)
    assert status["status"] == "completed", status
    installed = server.client.get("/models/download/bert/info").json()
    paths = {f["path"] for f in installed["files"]}
    assert "model.safetensors" in paths and "pytorch_model.bin" not in paths
    (conversion,) = installed["conversions"]
    assert conversion["original_sha256"] == sha256_of(pickled_bert / "pytorch_model.bin")


def test_pickled_weights_need_allow_pickle_under_allow(make_server, roots, pickled_bert):
    server = make_server([], import_roots=(roots,), pickle_policy="allow")
    refused = post(server, str(pickled_bert))
    assert refused.status_code == 400, refused.text
    assert "pytorch_model.bin" in refused.json()["message"]
    assert refused.json()["error"] == "Pickled weights need opt-in"
    assert_nothing_recorded(server)

    allowed = post(server, str(pickled_bert), allow_pickle=True, load=False)
    assert allowed.status_code == 202, allowed.text
    assert server.wait_for(allowed.json()["download_id"])["status"] == "completed"


def test_file_changed_after_planning_fails_the_job(make_server, roots, monkeypatch):
    """The store's copy is hashed again: bytes that changed since the plan never install."""
    from modelhost.fetch.engine import FetchEngine

    original = FetchEngine.import_required

    def tamper_then_import(self, spec, progress=None):
        if spec.path == "vocab.txt":
            Path(spec.local_source).write_text("changed\n")
        return original(self, spec, progress)

    monkeypatch.setattr(FetchEngine, "import_required", tamper_then_import)
    server = make_server([], import_roots=(roots,))
    started = post(server, str(roots / "bert"), load=False)
    assert started.status_code == 202, started.text
    status = server.wait_for(started.json()["download_id"])
    assert status["status"] == "failed", status
    assert status["error"] in ("Size mismatch", "Digest mismatch")
    assert server.client.get("/models/cache/info").json()["total_models"] == 0


def test_import_roots_setting_reads_a_comma_separated_list(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELHOST_IMPORT_ROOTS", f"{tmp_path}/a, {tmp_path}/b ,")
    assert Settings().import_roots == (tmp_path / "a", tmp_path / "b")
    monkeypatch.delenv("MODELHOST_IMPORT_ROOTS")
    assert Settings().import_roots == ()


def write_trainer_state(folder: Path) -> None:
    """What ``transformers.Trainer`` saves beside the weights of a checkpoint: pickles that are
    not state dicts of tensors (an optimizer's nested state, a scheduler's, RNG states with
    numpy arrays, a pickled ``TrainingArguments``-like object)."""
    import numpy as np
    import torch

    weight = torch.nn.Parameter(torch.zeros(4, 4))
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    weight.grad = torch.ones(4, 4)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    rng = {"python": (3, (1, 2), None), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    torch.save(rng, folder / "rng_state.pth")
    torch.save({"output_dir": "out", "learning_rate": 1e-3}, folder / "training_args.bin")
    (folder / "trainer_state.json").write_text('{"global_step": 1}')


@pytest.mark.parametrize("weights", ["safetensors", "pickled"])
def test_trainer_checkpoint_imports_under_the_default_policy(make_server, roots, weights):
    """A Trainer checkpoint directory imports under the default policy: only the weights go
    to the converter; the training state (optimizer, scheduler, RNG, arguments) is left out
    and the manifest's notes say so."""
    folder = roots / "bert"
    if weights == "pickled":
        import torch
        from safetensors.torch import load_file

        state = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        torch.save(state, folder / "pytorch_model.bin")
    write_trainer_state(folder)
    server = make_server([], import_roots=(roots,))
    started = post(server, str(folder))
    assert started.status_code == 202, started.text
    status = server.wait_for(started.json()["download_id"], timeout=120)
    assert status["status"] == "completed", status
    installed = server.client.get("/models/download/bert/info").json()
    paths = {f["path"] for f in installed["files"]}
    training = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}
    assert "model.safetensors" in paths and "trainer_state.json" in paths
    assert not paths & training
    assert [c["original_path"] for c in installed["conversions"]] == (
        ["pytorch_model.bin"] if weights == "pickled" else []
    )
    notes = " ".join(installed["spec"]["notes"])
    for name in training:
        assert f"left out {name}: training state" in notes
    prediction = server.client.post("/models/bert/predict", json={"inputs": "hello world"})
    assert prediction.status_code == 200, prediction.text
