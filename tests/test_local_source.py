"""The local source: a directory under MODELHOST_IMPORT_ROOTS imported like a download."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import serve_subprocess

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
    rng = {
        "python": (3, (1, 2), None),
        "numpy": np.random.get_state(),
        "cpu": torch.get_rng_state(),
    }
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


class EventWatcher:
    """Reads ``GET /events`` in a thread: every status message, to see how a job ended."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.statuses: list[dict] = []
        self.opened = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert self.opened.wait(10), "the event stream did not open"

    def _read(self) -> None:
        from modelhost.cli import sse

        with httpx.Client(base_url=self.base_url, timeout=None) as client:
            with client.stream("GET", "/events") as response:
                self.response = response
                self.opened.set()
                try:
                    for message in sse.messages(response.iter_lines()):
                        if message.event == "status":
                            self.statuses.append(message.data)
                except (httpx.HTTPError, RuntimeError):
                    pass  # closed by close(): the stream ends with the test

    def close(self) -> None:
        """End the stream: an open /events would hold the test server's shutdown (30 s).
        Shutting the socket down wakes the reading thread, which then closes the stream."""
        import socket as socket_module

        stream = self.response.extensions["network_stream"]
        stream.get_extra_info("socket").shutdown(socket_module.SHUT_RDWR)
        self.thread.join(timeout=10)

    def first(self, name: str, statuses: set[str], phase: str | None = None, limit_s=10.0):
        """The first status message of ``name``'s job in one of ``statuses``."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            for data in list(self.statuses):
                if data["model_name"] == name and data["status"] in statuses:
                    if phase is None or data["phase"] == phase:
                        return data
            time.sleep(0.02)
        raise AssertionError(f"no {statuses} status of {name}: {self.statuses}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Root reads every file whatever its mode: the server runs without the two capabilities
# that let it (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so a mode-000 file or directory is as
# unreadable to it as to any other user.
WITHOUT_READ_OVERRIDE = (
    ("setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--")
    if os.geteuid() == 0
    else ()
)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["file", "directory"])
def test_unreadable_path_is_400_naming_it_and_the_job_ends(tmp_path, roots, what):
    """A file or directory the server may not read: 400 naming it (not a 500), and the
    streams that saw the job planning see it end."""
    folder = roots / "bert"
    if what == "file":
        unreadable = folder / "vocab.txt"
    else:
        unreadable = folder / "extra"
        unreadable.mkdir()
        (unreadable / "notes.txt").write_text("hidden\n")
    unreadable.chmod(0)
    port = free_port()
    env = {
        **os.environ,
        "MODELHOST_HOME": str(tmp_path / "home"),
        "MODELHOST_IMPORT_ROOTS": str(roots),
        "MODELHOST_URL_ALLOW_DEFAULTS": "false",
    }
    process = serve_subprocess(port, env, wrapper=WITHOUT_READ_OVERRIDE)
    try:
        base = f"http://127.0.0.1:{port}"
        watcher = EventWatcher(base)
        response = httpx.post(
            f"{base}/models/download",
            json={"source": "local", "model_id": str(folder), "name": "bert", "load": False},
            timeout=30,
        )
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["error"] == "Permission denied"
        assert body["message"].startswith(f"{unreadable} cannot be read by the server")
        planning = watcher.first("bert", {"pending"}, phase="planning")
        ended = watcher.first("bert", {"failed", "cancelled", "completed"})
        assert ended["download_id"] == planning["download_id"]
        assert ended["status"] == "failed"
        listed = httpx.get(f"{base}/models/downloads", timeout=10).json()["downloads"]
        assert all(d["status"] != "pending" for d in listed)
    finally:
        unreadable.chmod(0o755)
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.serial
def test_cancel_of_a_job_still_planning_ends_it_at_once(make_server, roots):
    """A local import hashing a large file can be cancelled while it plans: the cancel
    answers 200 with the job cancelled, long before the hashing would have ended, and the
    POST that started it answers 409 Cancelled."""
    big = roots / "big"
    big.mkdir()
    (big / "config.json").write_text("{}")
    with open(big / "weights.dat", "wb") as handle:
        handle.truncate(8 * 1024**3)  # sparse: 8 GB of zeros, seconds of sha256
    server = make_server([], import_roots=(roots,))
    watcher = EventWatcher(server.base_url)
    answers: list[httpx.Response] = []
    poster = threading.Thread(
        target=lambda: answers.append(post(server, str(big), name="big", load=False))
    )
    poster.start()
    planning = watcher.first("big", {"pending"}, phase="planning")
    time.sleep(0.5)  # well into the hashing
    started = time.monotonic()
    cancelled = server.client.post(f"/models/download/{planning['download_id']}/cancel")
    took = time.monotonic() - started
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert took < 3, f"the cancel waited {took:.1f} s: the hashing did not stop"
    poster.join(timeout=30)
    (answer,) = answers
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"] == "Cancelled"
    assert answer.json()["status"] == "cancelled"
    assert answer.json()["download_id"] == planning["download_id"]
    status = server.client.get(f"/models/download/status/{planning['download_id']}").json()
    assert status["status"] == "cancelled"
    assert watcher.first("big", {"cancelled"})["download_id"] == planning["download_id"]
    assert server.client.get("/models/cache/info").json()["total_models"] == 0
    watcher.close()
