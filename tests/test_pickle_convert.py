"""Pickled weights are converted to safetensors by an isolated worker, never unpickled in
the server (MODELHOST_PICKLE_POLICY: convert, the default; refuse; allow).

The converter's unit tests run the real worker process on real checkpoints; the end-to-end
tests serve real tiny models from the Hub-compatible loopback server."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
import wave
from io import BytesIO
from pathlib import Path

import pytest
import torch
from hubserver import HubServer

from modelhost.convert import WORKER, ConvertLimits, convert_pickles, converted_name, run_worker
from modelhost.errors import FetchError, PickleRejected
from modelhost.store import CommitFile

# ------------------------------------------------------------------------------ helpers


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def saved(obj: object) -> bytes:
    buffer = BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class Touch:
    """Unpickling it would run ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_state_dict(marker: Path) -> bytes:
    """A file that looks like a state dict but whose pickle calls os.system."""
    return saved({"dense.weight": torch.ones(2, 2), "dense.bias": Touch(marker)})


def commit_file(path: str, local: Path) -> CommitFile:
    data = local.read_bytes()
    return CommitFile(path, local, len(data), sha256(data))


def no_blobs(sha: str) -> Path:
    raise AssertionError(f"blob {sha} looked up: every input has a local path")


# ------------------------------------------------------------------------------ converter


def test_converted_names_are_what_transformers_looks_for():
    assert converted_name("pytorch_model.bin") == "model.safetensors"
    assert converted_name("vocoder/pytorch_model.bin") == "vocoder/model.safetensors"
    assert converted_name("pytorch_model-00002-of-00003.bin") == "model-00002-of-00003.safetensors"
    assert converted_name("resnet18-f37072fd.pth") == "resnet18-f37072fd.safetensors"
    assert converted_name("foo.pt") == "foo.safetensors"


def test_sharded_checkpoint_converts_to_equal_tensors_and_a_new_index(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    embed = torch.randn(10, 4)
    shards = {
        "pytorch_model-00001-of-00002.bin": {
            "model.embed.weight": embed,
            "model.layer.weight": torch.randn(4, 4),
        },
        # A tied head shares the embedding's storage: safetensors cannot write that as is.
        "pytorch_model-00002-of-00002.bin": {
            "lm_head.weight": embed,
            "model.layer.bias": torch.arange(4, dtype=torch.int64),
            "model.half": torch.randn(3, 2).to(torch.float16).t(),  # not contiguous
        },
    }
    files = []
    for name, state in shards.items():
        (tmp_path / name).write_bytes(saved(state))
        files.append(commit_file(name, tmp_path / name))
    index = {
        "metadata": {"total_size": 0},
        "weight_map": {k: n for n, s in shards.items() for k in s},
    }
    pickled_index = tmp_path / "pytorch_model.bin.index.json"
    pickled_index.write_text(json.dumps(index))
    files.append(commit_file(pickled_index.name, pickled_index))
    (tmp_path / "config.json").write_text("{}")
    files.append(commit_file("config.json", tmp_path / "config.json"))

    result, conversions = convert_pickles(
        files, list(shards), tmp_path / "work", ConvertLimits(timeout_s=120), no_blobs
    )

    by_path = {f.path: f for f in result}
    assert sorted(by_path) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    for name, state in shards.items():
        new = by_path[converted_name(name)]
        assert new.sha256 == sha256(new.local_path.read_bytes())
        with safe_open(str(new.local_path), "pt") as handle:
            assert sorted(handle.keys()) == sorted(state)
            for key, tensor in state.items():
                assert torch.equal(handle.get_tensor(key), tensor), key
    new_index = json.loads(by_path["model.safetensors.index.json"].local_path.read_text())
    assert new_index["weight_map"] == {k: converted_name(n) for n, s in shards.items() for k in s}
    expected_bytes = sum(t.numel() * t.element_size() for s in shards.values() for t in s.values())
    assert new_index["metadata"]["total_size"] == expected_bytes
    assert [(c.original_path, c.converted_path, c.tensors) for c in conversions] == [
        (name, converted_name(name), len(state)) for name, state in shards.items()
    ]
    assert conversions[0].original_sha256 == sha256((tmp_path / list(shards)[0]).read_bytes())
    assert conversions[0].converted_sha256 == by_path[conversions[0].converted_path].sha256


def test_torchvision_style_checkpoint_with_a_state_dict_key(tmp_path):
    from safetensors.torch import load_file

    state = {"fc.weight": torch.randn(3, 2), "fc.bias": torch.randn(3)}
    (tmp_path / "net.pth").write_bytes(saved({"state_dict": state, "epoch": 3}))
    result, _ = convert_pickles(
        [commit_file("net.pth", tmp_path / "net.pth")],
        ["net.pth"],
        tmp_path / "work",
        ConvertLimits(timeout_s=120),
        no_blobs,
    )
    assert [f.path for f in result] == ["net.safetensors"]
    loaded = load_file(str(result[0].local_path))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    (tmp_path / "weights.pt").write_bytes(saved([torch.ones(2), {"a": 1}]))
    with pytest.raises(PickleRejected) as caught:
        convert_pickles(
            [commit_file("weights.pt", tmp_path / "weights.pt")],
            ["weights.pt"],
            tmp_path / "work",
            ConvertLimits(timeout_s=120),
            no_blobs,
        )
    assert caught.value.status_code == 422
    assert caught.value.message.startswith("weights.pt: it is not a state dict")
    assert "holds list" in caught.value.message and "allow_pickle" in caught.value.message


def test_a_pickle_that_calls_os_system_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "pytorch_model.bin").write_bytes(malicious_state_dict(marker))
    with pytest.raises(PickleRejected) as caught:
        convert_pickles(
            [commit_file("pytorch_model.bin", tmp_path / "pytorch_model.bin")],
            ["pytorch_model.bin"],
            tmp_path / "work",
            ConvertLimits(timeout_s=120),
            no_blobs,
        )
    assert caught.value.message.startswith("pytorch_model.bin is refused")
    assert "posix.system" in caught.value.message
    assert not marker.exists()
    assert not list((tmp_path / "work").glob("*.safetensors"))


def test_the_worker_runs_under_the_limits_asked_for(tmp_path):
    limits = ConvertLimits(timeout_s=77, address_space=5 * 1024**3).for_inputs(1000, 600)
    answer = run_worker([], limits, 60)
    assert answer["files"] == []
    assert answer["limits"] == {name: [value, value] for name, value in limits.items()}
    assert answer["limits"]["cpu_seconds"] == [77, 77]
    assert answer["limits"]["file_size"] == [2 * 600 + 64 * 1024 * 1024] * 2


def test_an_address_space_too_small_for_the_worker_fails_it(tmp_path):
    # 256 MiB cannot even hold torch: the limit is real, and the failure is an error, not junk.
    limits = ConvertLimits(timeout_s=60, address_space=256 * 1024**2).for_inputs(10, 10)
    with pytest.raises(FetchError, match="conversion worker failed"):
        run_worker([], limits, 60)


def test_the_worker_sees_no_network_no_subprocess_and_no_secrets(tmp_path):
    probe = f"""
import os, socket, subprocess, sys
sys.path.insert(0, {str(WORKER.parent)!r})
import worker
worker.install_guards()
results = {{}}
for name, attempt in [
    ("socket", lambda: socket.socket()),
    ("connect", lambda: socket.create_connection(("127.0.0.1", 9))),
    ("subprocess", lambda: subprocess.run(["true"])),
    ("system", lambda: os.system("true")),
    ("write", lambda: open("written", "w")),
    ("import", lambda: __import__("sqlite3")),
]:
    try:
        attempt()
        results[name] = "allowed"
    except PermissionError as exc:
        results[name] = str(exc)
print(results)
"""
    done = subprocess.run(
        [sys.executable, "-I", "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    results = eval(done.stdout)  # noqa: S307 - our own probe's dict literal
    assert all(v.startswith("the conversion worker may not") for v in results.values()), results
    assert not (tmp_path / "written").exists()


# /proc/<pid>/limits rows for the limits the worker is asked to set on itself.
PROC_LIMITS = {
    "address_space": "Max address space",
    "cpu_seconds": "Max cpu time",
    "file_size": "Max file size",
    "open_files": "Max open files",
    "core": "Max core file size",
}
SECRETS = {
    "HF_TOKEN": "hf_secret19",
    "HUGGING_FACE_HUB_TOKEN": "hf_secret19b",
    "MODELHOST_API_KEY": "key19",
    "AWS_SECRET_ACCESS_KEY": "aws19",
    "HTTPS_PROXY": "http://proxy19:1",
    "http_proxy": "http://proxy19:2",
}


def worker_children() -> list[int]:
    """The conversion workers this test process started (children running worker.py)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and str(WORKER).encode() in cmdline:
            found.append(int(entry.name))
    return found


def proc_limits(pid: int) -> dict[str, list[int | None]]:
    """The soft and hard limits of process ``pid`` as the kernel reports them."""
    rows = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        for name, label in PROC_LIMITS.items():
            if line.startswith(label):
                soft, hard = line[len(label) :].split()[:2]
                rows[name] = [None if v == "unlimited" else int(v) for v in (soft, hard)]
    return rows


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc: Linux")
def test_a_real_worker_has_no_secrets_no_sockets_and_the_limits_asked_for(tmp_path, monkeypatch):
    """The worker the converter really starts, inspected from outside while it runs: its
    environment (/proc/PID/environ) holds none of the parent's tokens, keys or proxies, it
    holds no socket, and the kernel reports the limits it was asked to set (/proc/PID/limits).
    It is held inside torch.load on a FIFO until inspected (the FIFO's writer end opens only
    once the worker reads it). Fails before: the test compared the implementation's own list
    of environment keys, never a running worker."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    fifo = tmp_path / "held.bin"
    os.mkfifo(fifo)
    limits = ConvertLimits(timeout_s=120, address_space=6 * 1024**3).for_inputs(1000, 600)
    answer: dict = {}

    def convert() -> None:
        answer.update(run_worker([(fifo, tmp_path / "out.safetensors")], limits, 120))

    thread = threading.Thread(target=convert)
    thread.start()
    writer = None
    deadline = time.monotonic() + 90
    try:
        while writer is None:  # ENXIO until the worker opens the FIFO to read it
            assert time.monotonic() < deadline, "the worker never read its input"
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.05)
        (pid,) = worker_children()
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode()
        for name, value in SECRETS.items():
            assert value not in environ and f"{name}=" not in environ, name
        keys = {item.split("=", 1)[0] for item in environ.split("\0") if item}
        assert not {k for k in keys if re.search("TOKEN|KEY|SECRET|PROXY|PASS", k, re.I)}, keys
        sockets = [
            fd.name
            for fd in Path(f"/proc/{pid}/fd").iterdir()
            if os.readlink(fd).startswith("socket:")
        ]
        assert sockets == [], sockets
        assert proc_limits(pid) == {name: [value, value] for name, value in limits.items()}
    finally:
        if writer is not None:
            os.close(writer)
        feed_until_done(fifo, thread)
    assert answer["refused"]["kind"] == "unpickling"  # it read what we sent, and refused it


def feed_until_done(fifo: Path, worker: threading.Thread) -> None:
    """Give every open of ``fifo`` by the worker (torch.load may open it more than once) a
    few bytes that are not a pickle, until the worker is done."""
    deadline = time.monotonic() + 120
    while worker.is_alive() and time.monotonic() < deadline:
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no reader now
            worker.join(0.05)
            continue
        try:
            os.write(writer, b"not a pickle")
        except BrokenPipeError:
            pass
        finally:
            os.close(writer)
        worker.join(0.05)
    assert not worker.is_alive()


# ------------------------------------------------------------------------------ end to end


@pytest.fixture
def hub(tiny_models, tmp_path):
    """The tiny SpeechT5 under its real id, and a HiFiGAN repo with only pytorch_model.bin."""
    import transformers

    vocoder = transformers.SpeechT5HifiGan.from_pretrained(tiny_models["hifigan"])
    bin_bytes = saved(vocoder.state_dict())
    with HubServer() as server:
        server.add_repo("microsoft/speecht5_tts", tiny_models["speecht5"])
        server.add_repo(
            "microsoft/speecht5_hifigan",
            {
                "config.json": (tiny_models["hifigan"] / "config.json").read_bytes(),
                "pytorch_model.bin": bin_bytes,
            },
        )
        server.vocoder_state = vocoder.state_dict()
        yield server


@pytest.fixture
def modelhost(make_server, hub, tmp_path):
    def start(**overrides):
        values = {"hf_endpoint": hub.base_url, "hf_hub_cache": tmp_path / "no-hf-cache"}
        values.update(overrides)
        return make_server([], device="cpu", **values)

    return start


CONTRACT_EXAMPLE = (
    '{"source":"huggingface","model_id":"microsoft/speecht5_tts","name":"speecht5_tts",'
    '"task":"text-to-speech","include_vocoder":true}'
)


def test_contract_speecht5_example_installs_a_converted_vocoder_and_speaks(modelhost, hub):
    from safetensors.torch import load_file

    server = modelhost()
    answer = server.client.post(
        "/models/download",
        content=CONTRACT_EXAMPLE,
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 202, answer.text
    status = server.wait_for(answer.json()["download_id"], timeout=180)
    assert status["status"] == "completed", status
    assert "vocoder/pytorch_model.bin -> vocoder/model.safetensors" in status["message"]

    info = server.client.get("/models/download/speecht5_tts/info").json()
    served = hub.file("microsoft/speecht5_hifigan", "pytorch_model.bin").read()
    directory = Path(info["path"])
    converted = directory / "vocoder" / "model.safetensors"
    [conversion] = info["conversions"]
    assert conversion["original_path"] == "vocoder/pytorch_model.bin"
    assert conversion["original_sha256"] == sha256(served)
    assert conversion["original_size"] == len(served)
    assert conversion["converted_path"] == "vocoder/model.safetensors"
    assert conversion["converted_sha256"] == sha256(converted.read_bytes())
    assert not list(directory.rglob("*.bin"))
    paths = {f["path"] for f in info["files"]}
    assert "vocoder/model.safetensors" in paths and "vocoder/pytorch_model.bin" not in paths
    state = load_file(str(converted))
    assert state.keys() == hub.vocoder_state.keys()
    assert all(torch.equal(state[k], hub.vocoder_state[k]) for k in state)

    spoken = server.client.post(
        "/synthesize", json={"model_name": "speecht5_tts", "text": "hello there", "seed": 1}
    )
    assert spoken.status_code == 200, spoken.text
    with wave.open(BytesIO(spoken.content)) as handle:
        assert handle.getframerate() == 16000
        frames = handle.readframes(handle.getnframes())
    samples = struct.unpack(f"<{len(frames) // 2}h", frames)
    assert len(samples) > 0 and max(abs(s) for s in samples) > 0


@pytest.mark.parametrize("policy", ["convert", "refuse", "allow"])
def test_a_malicious_pickle_is_never_run(modelhost, hub, tiny_models, tmp_path, policy):
    marker = tmp_path / "marker"
    files = {
        "config.json": (tiny_models["bert"] / "config.json").read_bytes(),
        "pytorch_model.bin": malicious_state_dict(marker),
    }
    for extra in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_models["bert"] / extra).is_file():
            files[extra] = (tiny_models["bert"] / extra).read_bytes()
    hub.add_repo("evil-org/tiny-bert", files)
    server = modelhost(pickle_policy=policy)
    body = {"source": "huggingface", "model_id": "evil-org/tiny-bert", "name": "evil"}
    if policy == "allow":
        body["allow_pickle"] = True
    answer = server.client.post("/models/download", json=body)

    if policy == "refuse":
        assert answer.status_code == 400, answer.text
        refused = answer.json()
        assert refused["success"] is False
        assert "MODELHOST_PICKLE_POLICY=refuse" in refused["message"]
        assert "pytorch_model.bin" in refused["message"]
        again = server.client.post("/models/download", json={**body, "allow_pickle": True})
        assert again.status_code == 400 and "refuse" in again.json()["message"]
        assert server.client.get("/models/downloads").json()["total"] == 0
        assert server.client.get("/models/download/evil/info").status_code == 404
    elif policy == "convert":
        assert answer.status_code == 202, answer.text
        status = server.wait_for(answer.json()["download_id"], timeout=180)
        assert status["status"] == "failed", status
        assert "pytorch_model.bin is refused" in status["message"]
        assert "posix.system" in status["message"]
        assert status["error"] == "Pickled weights refused"
        assert server.client.get("/models/download/evil/info").status_code == 404
        assert not list((Path(server.settings.home) / "partial").glob("*.part"))
    else:
        assert answer.status_code == 202, answer.text
        status = server.wait_for(answer.json()["download_id"], timeout=180)
        # Installed, but the load the request asked for failed: the job fails, saying so.
        assert status["status"] == "failed", status
        assert "installed, but loading failed: " in status["message"]
        assert "retry with: modelhost load evil" in status["message"]
        assert "posix.system" in status["message"]
        assert server.client.get("/models/download/evil/info").status_code == 200
        load = server.client.post("/models/evil/load", json={"allow_pickle": True})
        assert load.status_code == 400, load.text
        assert "weights_only=True" in load.json()["message"]
        assert "posix.system" in load.json()["message"]
    assert not marker.exists()


def test_url_state_dict_is_converted_and_a_non_state_dict_fails(make_server, fileserver):
    from safetensors.torch import load_file

    state = {"linear.weight": torch.randn(3, 4), "linear.bias": torch.randn(3)}
    fileserver.add("/weights.pth", saved(state))
    fileserver.add("/other.pt", saved({"epoch": 3, "optimizer": [1, 2]}))
    server = make_server([fileserver.host_port], device="cpu")

    answer = server.client.post(
        "/models/download",
        json={"source": "url", "model_id": fileserver.url("/weights.pth"), "name": "sd"},
    )
    assert answer.status_code == 202, answer.text
    status = server.wait_for(answer.json()["download_id"], timeout=120)
    assert status["status"] == "completed", status
    info = server.client.get("/models/download/sd/info").json()
    assert [f["path"] for f in info["files"]] == ["weights.safetensors"]
    assert info["conversions"][0]["original_sha256"] == sha256(saved(state))
    loaded = load_file(str(Path(info["path"]) / "weights.safetensors"))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    failed = server.client.post(
        "/models/download",
        json={"source": "url", "model_id": fileserver.url("/other.pt"), "name": "other"},
    )
    status = server.wait_for(failed.json()["download_id"], timeout=120)
    assert status["status"] == "failed", status
    assert "other.pt: it is not a state dict" in status["message"]
    assert "allow_pickle" in status["message"] and "load_as" in status["message"]
    assert server.client.get("/models/download/other/info").status_code == 404

    torchscript = server.client.post(
        "/models/download",
        json={
            "source": "url",
            "model_id": fileserver.url("/weights.pth"),
            "name": "ts",
            "load_as": "torchscript",
        },
    )
    assert torchscript.status_code == 400
    assert "TorchScript archive" in torchscript.json()["message"]
    assert "allow_pickle" in torchscript.json()["message"]


def test_status_shows_the_converting_phase(make_server, fileserver, monkeypatch):
    import threading
    import time

    import modelhost.jobs.manager as manager

    release, entered = threading.Event(), threading.Event()
    real = manager.convert_pickles

    def held(*args, **kwargs):  # the real conversion, once the test has seen the phase
        entered.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(manager, "convert_pickles", held)
    fileserver.add("/w.pth", saved({"w": torch.ones(2)}))
    server = make_server([fileserver.host_port], device="cpu")
    answer = server.client.post(
        "/models/download",
        json={"source": "url", "model_id": fileserver.url("/w.pth"), "name": "w"},
    )
    download_id = answer.json()["download_id"]
    assert entered.wait(60)
    deadline = time.monotonic() + 10
    while True:
        status = server.client.get(f"/models/download/status/{download_id}").json()
        if status["phase"] == "converting" or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert status["status"] == "downloading" and status["phase"] == "converting", status
    assert status["message"] == "Converting pickled weights to safetensors: w.pth"
    release.set()
    done = server.wait_for(download_id, timeout=120)
    assert done["status"] == "completed" and done["phase"] == "completed"
    assert "w.pth -> w.safetensors" in done["message"]


def test_patterns_selecting_pickle_and_safetensors_install_the_safetensors(
    modelhost, hub, tiny_models
):
    """allow_patterns that match both pytorch_model.bin and model.safetensors: converting the
    pickle would make a second model.safetensors ("Duplicate file path" after both
    downloads). The safetensors are the same model's weights, so the pickle is left out."""
    bert = tiny_models["bert"]
    files = {p.name: p.read_bytes() for p in bert.iterdir() if p.is_file()}
    from safetensors.torch import load_file

    state = load_file(str(bert / "model.safetensors"))
    files["pytorch_model.bin"] = saved(state)
    hub.add_repo("both-org/tiny-bert", files)
    server = modelhost()
    answer = server.client.post(
        "/models/download",
        json={
            "source": "huggingface",
            "model_id": "both-org/tiny-bert",
            "name": "both",
            "allow_patterns": ["*.json", "*.txt", "*.safetensors", "*.bin"],
            "load": False,
        },
    )
    assert answer.status_code == 202, answer.text
    status = server.wait_for(answer.json()["download_id"], timeout=120)
    assert status["status"] == "completed", status
    info = server.client.get("/models/download/both/info").json()
    paths = {f["path"] for f in info["files"]}
    assert "model.safetensors" in paths and "pytorch_model.bin" not in paths
    assert not info.get("conversions")
    installed = Path(info["path"]) / "model.safetensors"
    assert sha256(installed.read_bytes()) == sha256(files["model.safetensors"])
