"""The Hugging Face mirror (/hf): installed models served back in the Hub's read protocol.

Tiny real models are installed into a modelhost server from the loopback test Hub
(``tests/hubserver.py``); then the real clients (huggingface_hub, transformers,
sentence-transformers, the ``hf`` CLI) run in subprocesses with ``HF_ENDPOINT`` set to the
server's ``/hf``, and must get exactly the installed bytes, their own exceptions, and not
one request to the upstream Hub.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RunningServer, make_settings
from hubserver import HubServer, lfs_pointer
from test_hubserver import client_env as hub_client_env
from tiny_models import MINILM_REPO

from modelhost.api import zerocopy
from modelhost.mirror import protocol

BERT = "test-org/tiny-bert"
TTS, VOCODER = "microsoft/speecht5_tts", "microsoft/speecht5_hifigan"
PR = "refs/pr/1"  # a branch whose name holds slashes: sent as refs%2Fpr%2F1
KEY = "mirror-test-key"
MISSING = "test-org/not-installed"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def hub(tiny_models: dict[str, Path]) -> Iterator[HubServer]:
    """BERT (tag v1.0, and a branch refs/pr/1 with one more file), MiniLM, SpeechT5 and a
    vocoder repository that only has pickled weights (converted at install)."""
    import torch
    from safetensors.torch import load_file

    pickled = BytesIO()
    torch.save(load_file(tiny_models["hifigan"] / "model.safetensors"), pickled)
    with HubServer() as server:
        server.add_repo(BERT, tiny_models["bert"])
        server.add_tag(BERT, "v1.0", "main")
        server.push(BERT, {"extra.txt": b"only on the pull request\n"}, branch=PR)
        server.add_repo(MINILM_REPO, tiny_models["minilm"])
        server.add_repo(TTS, tiny_models["speecht5"])
        server.add_repo(
            VOCODER,
            {
                "config.json": (tiny_models["hifigan"] / "config.json").read_bytes(),
                "pytorch_model.bin": pickled.getvalue(),
            },
        )
        yield server


def start(home: Path, hub: HubServer, http: Any = None, **overrides: Any) -> RunningServer:
    settings = make_settings(
        home, [], hf_endpoint=hub.base_url, hf_hub_cache=home.parent / "no-hf-cache", **overrides
    )
    server = RunningServer(settings) if http is None else RunningServer(settings, http=http)
    return server.start()


def install(server: RunningServer, repo_id: str, name: str, **extra: Any) -> dict:
    """Install ``repo_id`` as ``name`` (not loaded); its manifest as the API shows it."""
    body = {"source": "huggingface", "model_id": repo_id, "name": name, "load": False, **extra}
    response = server.client.post("/models/download", json=body)
    assert response.status_code == 202, response.text
    status = server.wait_for(response.json()["download_id"], timeout=180)
    assert status["status"] == "completed", status
    return server.client.get(f"/models/download/{name}/info").json()


def files_of(manifest: dict, folder: str = "") -> dict[str, str]:
    """sha256 by path of the installed files of one repository (a component: its folder)."""
    files = {f["path"]: f["sha256"] for f in manifest["files"]}
    if folder:
        return {p[len(folder) + 1 :]: s for p, s in files.items() if p.startswith(folder + "/")}
    folders = tuple(c["path"] + "/" for c in manifest["spec"]["components"])
    return {p: s for p, s in files.items() if not p.startswith(folders)}


@pytest.fixture(scope="module")
def mirror(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server with BERT (main, the tag v1.0 and refs/pr/1), MiniLM and SpeechT5 with
    its converted vocoder installed; ``installed`` holds their manifests."""
    server = start(tmp_path_factory.mktemp("mirror") / "home", hub)
    server.installed = {
        "bert": install(server, BERT, "tiny-bert"),
        "bert_v1": install(server, BERT, "tiny-bert-v1", revision="v1.0"),
        "pr": install(server, BERT, "tiny-bert-pr", revision=PR),
        "minilm": install(server, MINILM_REPO, "minilm"),
        "tts": install(server, TTS, "speecht5_tts", task="text-to-speech", include_vocoder=True),
    }
    yield server
    server.stop()


# --------------------------------------------------------------------------- clients

_PRELUDE = r"""
import hashlib, json
from pathlib import Path

def sha256_file(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

def tree(root):
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and ".cache" not in p.parts}

def attempt(fn):
    try:
        return {"ok": fn()}
    except Exception as e:
        response = getattr(e, "response", None)
        return {"error": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                "status": getattr(response, "status_code", None), "message": str(e)}

out = {}
"""


def client_env(tmp: Path, endpoint: str, token: str | None = None) -> dict[str, str]:
    """A Hub client's environment with the mirror as its Hub (test_hubserver's clean one),
    and ``token`` as its ``HF_TOKEN``."""
    env = hub_client_env(tmp, endpoint)
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def start_client(tmp: Path, endpoint: str, code: str, token: str | None = None) -> subprocess.Popen:
    """A Python client subprocess running ``code`` (which fills ``out``); see ``finish``."""
    script = _PRELUDE + code + '\nprint("@@RESULT@@" + json.dumps(out))\n'
    return subprocess.Popen(
        [sys.executable, "-c", script],
        env=client_env(tmp, endpoint, token),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> dict[str, Any]:
    stdout, stderr = process.communicate(timeout=300)
    marker = [line for line in stdout.splitlines() if line.startswith("@@RESULT@@")]
    assert process.returncode == 0 and marker, f"client failed:\n{stderr[-4000:]}"
    return json.loads(marker[-1][len("@@RESULT@@") :])


def ok(results: dict[str, Any], name: str) -> Any:
    entry = results[name]
    assert "ok" in entry, f"{name}: {entry}"
    return entry["ok"]


def endpoint(server: RunningServer) -> str:
    return f"{server.base_url}/hf"


# --------------------------------------------------------------------------- through clients


HUB_CLIENT = """
from huggingface_hub import hf_hub_download, snapshot_download
out["pinned"] = attempt(
    lambda: tree(snapshot_download(BERT, revision=COMMIT, cache_dir=CACHE + "/c1")))
out["main"] = attempt(lambda: tree(snapshot_download(BERT, cache_dir=CACHE + "/c2")))
out["json_only"] = attempt(lambda: tree(
    snapshot_download(MINILM, allow_patterns=["*.json"], cache_dir=CACHE + "/c3")))
out["file"] = attempt(lambda: sha256_file(hf_hub_download(BERT, "model.safetensors")))
out["tag"] = attempt(lambda: sha256_file(hf_hub_download(BERT, "config.json", revision="v1.0")))
out["pr"] = attempt(lambda: Path(hf_hub_download(BERT, "extra.txt", revision=PR)).read_text())
out["pr_commit"] = attempt(
    lambda: Path(hf_hub_download(BERT, "extra.txt", revision=PR)).parent.name)
out["vocoder"] = attempt(lambda: tree(snapshot_download(VOCODER, cache_dir=CACHE + "/c4")))
out["tts"] = attempt(lambda: tree(snapshot_download(TTS, cache_dir=CACHE + "/c5")))
"""

LIBRARIES = """
import torch, transformers
from sentence_transformers import SentenceTransformer

def digest(model):
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

texts = ["a model server that tells the truth", "hello world"]
out["bert"] = attempt(lambda: digest(transformers.AutoModel.from_pretrained(BERT)))
out["bert_local"] = attempt(lambda: digest(transformers.AutoModel.from_pretrained(BERT_DIR)))
out["minilm"] = attempt(lambda: SentenceTransformer(MINILM, device="cpu").encode(texts).tolist())
out["minilm_local"] = attempt(
    lambda: SentenceTransformer(MINILM_DIR, device="cpu").encode(texts).tolist())
"""


def variables(**values: str) -> str:
    return "".join(f"{name} = {value!r}\n" for name, value in values.items())


def test_hub_clients_download_the_installed_bytes_and_the_hub_sees_nothing(
    mirror, hub, tiny_models, tmp_path
):
    installed = mirror.installed
    commit = installed["bert"]["revision"]
    names = variables(
        BERT=BERT, MINILM=MINILM_REPO, VOCODER=VOCODER, TTS=TTS, PR=PR, COMMIT=commit,
        BERT_DIR=str(tiny_models["bert"]), MINILM_DIR=str(tiny_models["minilm"]),
        CACHE=str(tmp_path / "a" / "caches"),
    )  # fmt: skip
    hub.reset_log()
    sent_before = zerocopy.SENT.bytes
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "cli").mkdir()
    hf_cli = str(Path(sys.executable).parent / "hf")
    cli = subprocess.Popen(
        [hf_cli, "download", BERT, "--local-dir", str(tmp_path / "cli" / "bert")],
        env=client_env(tmp_path / "cli", endpoint(mirror)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    libraries = start_client(tmp_path / "b", endpoint(mirror), names + LIBRARIES)
    hub_client = finish(start_client(tmp_path / "a", endpoint(mirror), names + HUB_CLIENT))
    loaded = finish(libraries)
    cli_out, cli_err = cli.communicate(timeout=300)

    bert = files_of(installed["bert"])
    assert ok(hub_client, "pinned") == bert
    assert ok(hub_client, "main") == bert
    minilm = files_of(installed["minilm"])
    json_files = {p: s for p, s in minilm.items() if p.endswith(".json")}
    assert "1_Pooling/config.json" in json_files
    assert ok(hub_client, "json_only") == json_files
    assert ok(hub_client, "file") == bert["model.safetensors"]
    assert ok(hub_client, "tag") == bert["config.json"]
    assert ok(hub_client, "pr") == "only on the pull request\n"
    assert ok(hub_client, "pr_commit") == installed["pr"]["revision"] == hub.commit_of(BERT, PR)
    # The vocoder is its own repository, with its pickle converted; SpeechT5's without it.
    assert ok(hub_client, "vocoder") == files_of(installed["tts"], "vocoder")
    assert set(ok(hub_client, "vocoder")) == {"config.json", "model.safetensors"}
    assert ok(hub_client, "tts") == files_of(installed["tts"])

    assert ok(loaded, "bert") == ok(loaded, "bert_local")
    assert ok(loaded, "minilm") == ok(loaded, "minilm_local")
    assert len(ok(loaded, "minilm")[0]) == 384

    assert cli.returncode == 0, cli_err
    cli_files = {
        p.relative_to(tmp_path / "cli" / "bert").as_posix(): sha256(p.read_bytes())
        for p in (tmp_path / "cli" / "bert").rglob("*")
        if p.is_file() and ".cache" not in p.parts
    }
    assert cli_files == bert

    assert hub.requests == [], [r.path for r in hub.requests]  # not one request upstream
    assert zerocopy.SENT.bytes > sent_before  # the files went out with sendfile


ERRORS = """
from huggingface_hub import hf_hub_download, snapshot_download, list_repo_tree
out["repo"] = attempt(lambda: hf_hub_download(MISSING, "config.json"))
out["repo_snapshot"] = attempt(lambda: snapshot_download(MISSING))
out["revision"] = attempt(lambda: hf_hub_download(BERT, "config.json", revision="v9"))
out["revision_snapshot"] = attempt(lambda: snapshot_download(BERT, revision="v9"))
out["entry"] = attempt(lambda: hf_hub_download(BERT, "no-such-file.txt"))
out["pickle"] = attempt(lambda: hf_hub_download(VOCODER, "pytorch_model.bin"))
out["converted"] = attempt(lambda: sha256_file(hf_hub_download(VOCODER, "model.safetensors")))
out["listing"] = attempt(lambda: sorted(f.path for f in list_repo_tree(VOCODER)))
"""


def test_clients_raise_their_own_errors_and_a_converted_pickle_says_where_it_went(mirror, tmp_path):
    names = variables(BERT=BERT, MISSING=MISSING, VOCODER=VOCODER)
    results = finish(start_client(tmp_path, endpoint(mirror), names + ERRORS))
    assert results["repo"]["error"] == "RepositoryNotFoundError", results["repo"]
    assert results["repo_snapshot"]["error"] == "RepositoryNotFoundError"
    assert "not installed in this modelhost" in results["repo"]["message"]
    assert results["revision"]["error"] == "RevisionNotFoundError", results["revision"]
    assert results["revision_snapshot"]["error"] == "RevisionNotFoundError"
    assert "EntryNotFoundError" in results["entry"]["mro"], results["entry"]
    pickle = results["pickle"]
    assert "EntryNotFoundError" in pickle["mro"], pickle
    assert "converted to safetensors" in pickle["message"]
    assert "model.safetensors" in pickle["message"]
    vocoder = files_of(mirror.installed["tts"], "vocoder")
    assert ok(results, "converted") == vocoder["model.safetensors"]
    assert ok(results, "listing") == ["config.json", "model.safetensors"]


# --------------------------------------------------------------------------- the wire


def resolve_url(path: str, revision: str = "main", repo: str = BERT) -> str:
    return f"/hf/{repo}/resolve/{revision}/{path}"


def test_ranges_heads_and_etags_as_the_hub_sends_them(mirror, hub):
    client = mirror.client
    weights = hub.file(BERT, "model.safetensors")
    config = hub.file(BERT, "config.json")
    data = weights.read()
    commit = mirror.installed["bert"]["revision"]

    head = client.head(resolve_url("model.safetensors"))
    assert head.status_code == 200 and head.content == b""
    assert head.headers["x-repo-commit"] == commit
    # LFS: the sha256 in quotes; not LFS: the git blob id, as the Hub (hubserver) sends them.
    assert head.headers["etag"] == head.headers["x-linked-etag"] == weights.etag
    assert head.headers["content-length"] == head.headers["x-linked-size"] == str(len(data))
    assert head.headers["accept-ranges"] == "bytes"
    assert not [h for h in head.headers if h.startswith("x-xet")]
    assert client.head(resolve_url("config.json")).headers["etag"] == config.etag

    part = client.get(resolve_url("model.safetensors"), headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-1099/{len(data)}"
    assert part.content == data[100:1100]
    tail = client.get(resolve_url("model.safetensors"), headers={"Range": "bytes=-7"})
    assert (tail.status_code, tail.content) == (206, data[-7:])
    rest = client.get(
        resolve_url("model.safetensors"),
        headers={"Range": f"bytes={len(data) - 5}-", "If-Range": weights.etag},
    )
    assert (rest.status_code, rest.content) == (206, data[-5:])
    stale = client.get(
        resolve_url("model.safetensors"),
        headers={"Range": "bytes=0-9", "If-Range": '"another-version"'},
    )
    assert (stale.status_code, stale.content) == (200, data)  # If-Range: not ours, all of it

    beyond = client.get(resolve_url("model.safetensors"), headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(data)}"
    assert "past the end" in beyond.json()["error"]

    # A revision with slashes, encoded: one segment.
    encoded = client.get(resolve_url("extra.txt", "refs%2Fpr%2F1"))
    assert encoded.status_code == 200 and encoded.content == b"only on the pull request\n"
    assert encoded.headers["x-repo-commit"] == hub.commit_of(BERT, PR)


def test_tree_and_paths_info_match_the_hub_and_pages_follow_link(
    mirror, hub, monkeypatch, tmp_path
):
    client = mirror.client
    listing = httpx.get(f"{hub.base_url}/api/models/{MINILM_REPO}/tree/main?recursive=true")
    # Installs leave .gitattributes out, so the mirror has none.
    theirs = [e for e in listing.json() if e["path"] != ".gitattributes"]
    ours = client.get(f"/hf/api/models/{MINILM_REPO}/tree/main?recursive=true").json()
    assert ours == theirs  # entries, git ids of files, LFS pointers and directories alike
    top = client.get(f"/hf/api/models/{MINILM_REPO}/tree/main").json()
    assert {e["path"] for e in top} == {e["path"] for e in theirs if "/" not in e["path"]}
    sub = client.get(f"/hf/api/models/{MINILM_REPO}/tree/main/1_Pooling").json()
    assert [e["path"] for e in sub] == ["1_Pooling/config.json"]
    assert client.get(f"/hf/api/models/{MINILM_REPO}/tree/main/nope").headers["x-error-code"] == (
        "EntryNotFound"
    )
    asked = {"paths": ["config.json", "1_Pooling", "missing"]}
    info = client.post(f"/hf/api/models/{MINILM_REPO}/paths-info/main", data=asked).json()
    hub_info = f"{hub.base_url}/api/models/{MINILM_REPO}/paths-info/main"
    assert info == httpx.post(hub_info, data=asked).json()
    assert [e["path"] for e in info] == ["config.json", "1_Pooling"]
    as_json = client.post(
        f"/hf/api/models/{MINILM_REPO}/paths-info/main", json={"paths": ["model.safetensors"]}
    ).json()
    assert as_json == [e for e in theirs if e["path"] == "model.safetensors"]

    page_size = 3
    monkeypatch.setattr(protocol, "TREE_PAGE_SIZE", page_size)
    tree_sample = 'modelhost_mirror_requests_total{kind="tree",status="200"}'
    trees_before = metric_value(mirror, tree_sample)
    pages, url, listed = (
        0,
        f"{mirror.base_url}/hf/api/models/{MINILM_REPO}/tree/main?recursive=true",
        [],
    )
    while url:
        answer = httpx.get(url)
        listed += answer.json()
        pages += 1
        url = answer.links.get("next", {}).get("url")
    assert listed == theirs and pages == math.ceil(len(theirs) / page_size) > 1

    # huggingface_hub follows the pages itself.
    code = variables(MINILM=MINILM_REPO) + (
        "from huggingface_hub import snapshot_download\n"
        'out["snap"] = attempt(lambda: tree(snapshot_download(MINILM, allow_patterns=["*.txt"])))\n'
    )
    results = finish(start_client(tmp_path, endpoint(mirror), code))
    minilm = files_of(mirror.installed["minilm"])
    assert ok(results, "snap") == {p: s for p, s in minilm.items() if p.endswith(".txt")}
    # The listing above and the client's, page by page.
    assert metric_value(mirror, tree_sample) - trees_before == 2 * pages


def metric_value(server: RunningServer, sample: str) -> float:
    for line in server.client.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def mirror_counters(server: RunningServer) -> dict[str, Any]:
    counters = server.client.get("/models/cache/info").json()["mirror"]
    counters["metrics"] = {
        name: metric_value(server, name)
        for name in (
            "modelhost_mirror_bytes_served_total",
            "modelhost_mirror_hits_total",
            "modelhost_mirror_misses_total",
            'modelhost_mirror_requests_total{kind="resolve",status="200"}',
            'modelhost_mirror_requests_total{kind="resolve",status="206"}',
            'modelhost_mirror_requests_total{kind="resolve",status="404"}',
            'modelhost_mirror_requests_total{kind="info",status="200"}',
            'modelhost_mirror_requests_total{kind="info",status="404"}',
            'modelhost_mirror_requests_total{kind="tree",status="200"}',
        )
    }
    return counters


def test_counters_move_by_exactly_what_was_asked(mirror, hub):
    client = mirror.client
    size = hub.file(BERT, "model.safetensors").size
    before = mirror_counters(mirror)
    sent = zerocopy.SENT.bytes
    client.get(f"/hf/api/models/{BERT}")  # info 200: hit
    client.get(f"/hf/api/models/{BERT}/tree/main")  # tree 200: hit
    client.get(resolve_url("model.safetensors"))  # resolve 200: hit, size bytes
    client.get(resolve_url("model.safetensors"), headers={"Range": "bytes=0-9"})  # 206
    client.head(resolve_url("config.json"))  # resolve 200, no bytes: hit
    client.get(f"/hf/api/models/{MISSING}")  # info 404: miss
    client.get(resolve_url("nope.txt"))  # resolve 404: miss
    after = mirror_counters(mirror)

    assert after["mode"] == "cache"
    assert after["requests"] - before["requests"] == 7
    assert after["bytes_served"] - before["bytes_served"] == size + 10
    assert after["hits"] - before["hits"] == 5
    assert after["misses"] - before["misses"] == 2
    assert after["hit_rate"] == after["hits"] / (after["hits"] + after["misses"])
    moved = {k: after["metrics"][k] - before["metrics"][k] for k in after["metrics"]}
    assert moved == {
        "modelhost_mirror_bytes_served_total": size + 10,
        "modelhost_mirror_hits_total": 5,
        "modelhost_mirror_misses_total": 2,
        'modelhost_mirror_requests_total{kind="resolve",status="200"}': 2,
        'modelhost_mirror_requests_total{kind="resolve",status="206"}': 1,
        'modelhost_mirror_requests_total{kind="resolve",status="404"}': 1,
        'modelhost_mirror_requests_total{kind="info",status="200"}': 1,
        'modelhost_mirror_requests_total{kind="info",status="404"}': 1,
        'modelhost_mirror_requests_total{kind="tree",status="200"}': 1,
    }
    assert zerocopy.SENT.bytes - sent == size + 10  # every file byte went by sendfile
    # The contract's fields are all still there.
    cache = client.get("/models/cache/info").json()
    assert {"cache_directory", "total_models", "cache_optimization", "tts_specific"} <= set(cache)


def test_a_foreign_host_is_refused_in_the_hubs_shape(mirror):
    answer = mirror.client.get(f"/hf/api/models/{BERT}", headers={"Host": "evil.example:8000"})
    assert answer.status_code == 403
    assert "MODELHOST_ALLOWED_HOSTS" in answer.json()["error"]
    assert "MODELHOST_ALLOWED_HOSTS" in answer.headers["x-error-message"]


def test_datasets_and_unknown_paths_answer_in_the_hubs_shape(mirror):
    dataset = mirror.client.get("/hf/api/datasets/org/data/revision/main")
    assert dataset.status_code == 404 and dataset.headers["x-error-code"] == "RepoNotFound"
    assert "model repositories only" in dataset.json()["error"]
    unknown = mirror.client.get("/hf/whatever")
    assert unknown.status_code == 404 and "read protocol" in unknown.json()["error"]
    assert mirror.client.put(f"/hf/api/models/{BERT}").status_code == 405


# --------------------------------------------------------------------------- settings


def test_with_an_api_key_the_mirror_needs_it_as_the_hub_token(hub, tmp_path):
    server = start(tmp_path / "home", hub, api_key=KEY)
    try:
        server.client.headers["Authorization"] = f"Bearer {KEY}"
        manifest = install(server, BERT, "tiny-bert")
        refused = httpx.get(f"{server.base_url}/hf/api/models/{BERT}")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "API key" in refused.json()["error"] and "x-error-code" not in refused.headers

        code = variables(BERT=BERT) + (
            "from huggingface_hub import hf_hub_download, snapshot_download\n"
            'out["file"] = attempt(lambda: sha256_file(hf_hub_download(BERT, "config.json")))\n'
            'out["snapshot"] = attempt(lambda: tree(snapshot_download(BERT)))\n'
        )
        without = finish(start_client(tmp_path / "no-token", endpoint(server), code))
        for name in ("file", "snapshot"):
            assert without[name]["error"] == "HfHubHTTPError", without[name]
            assert without[name]["status"] == 401
            assert "MODELHOST_API_KEY" in without[name]["message"]
        with_key = finish(start_client(tmp_path / "token", endpoint(server), code, token=KEY))
        assert ok(with_key, "file") == files_of(manifest)["config.json"]
        assert ok(with_key, "snapshot") == files_of(manifest)
        counted = server.client.get("/models/cache/info").json()["mirror"]
        assert counted["requests"] >= 3 and counted["hits"] >= 2
    finally:
        server.stop()


def test_mirror_off_and_pull_not_built(hub, tmp_path):
    off = start(tmp_path / "off", hub, mirror="off")
    try:
        answer = off.client.get(f"/hf/api/models/{BERT}")
        assert answer.status_code == 404 and answer.headers["x-error-code"] == "RepoNotFound"
        assert "MODELHOST_MIRROR=off" in answer.json()["error"]
        assert off.client.get(resolve_url("config.json")).status_code == 404
        counted = off.client.get("/models/cache/info").json()["mirror"]
        assert counted == {
            "mode": "off", "requests": 2, "bytes_served": 0, "hits": 0, "misses": 0,
            "hit_rate": None,
        }  # fmt: skip
    finally:
        off.stop()
    pull = start(tmp_path / "pull", hub, mirror="pull")
    try:
        install(pull, BERT, "tiny-bert")
        for path in (f"/hf/api/models/{MISSING}", f"/hf/api/models/{BERT}/revision/v9"):
            answer = pull.client.get(path)
            assert answer.status_code == 501, path
            assert (
                "pull-through" in answer.json()["error"] and "not built" in answer.json()["error"]
            )
        assert pull.client.get(resolve_url("config.json")).status_code == 200
        assert pull.client.get("/models/cache/info").json()["mirror"]["misses"] == 2
    finally:
        pull.stop()


def test_without_the_zero_copy_extension_files_are_copied_right(hub, tmp_path):
    server = start(tmp_path / "home", hub, http="h11")  # uvicorn's own protocol
    try:
        install(server, BERT, "tiny-bert")
        data = hub.file(BERT, "model.safetensors").read()
        sent = zerocopy.SENT.bytes
        whole = server.client.get(resolve_url("model.safetensors"))
        part = server.client.get(resolve_url("model.safetensors"), headers={"Range": "bytes=5-20"})
        assert (whole.status_code, whole.content) == (200, data)
        assert (part.status_code, part.content) == (206, data[5:21])
        assert zerocopy.SENT.bytes == sent
        assert server.client.get("/models/cache/info").json()["mirror"]["bytes_served"] == (
            len(data) + 16
        )
    finally:
        server.stop()


# --------------------------------------------------------------------------- protocol


@pytest.mark.parametrize(
    ("header", "if_range", "expected"),
    [
        (None, None, None),
        ("bytes=0-9", None, (0, 10)),
        ("bytes=90-", None, (90, 100)),
        ("bytes=90-500", None, (90, 100)),
        ("bytes=-10", None, (90, 100)),
        ("bytes=-500", None, (0, 100)),
        ("bytes=0-9", '"etag"', (0, 10)),
        ("bytes=0-9", '"other"', None),  # If-Range not ours: the whole file
        ("bytes=0-9,20-29", None, None),  # several ranges: the whole file
        ("items=0-9", None, None),
        ("bytes=9-0", None, None),
        ("bytes=x-y", None, None),
        ("bytes=100-", None, 416),
        ("bytes=-0", None, 416),
    ],
)
def test_byte_ranges(header, if_range, expected):
    if expected == 416:
        with pytest.raises(protocol.RangeNotSatisfiable):
            protocol.byte_range(header, if_range, '"etag"', 100)
    else:
        assert protocol.byte_range(header, if_range, '"etag"', 100) == expected


def test_paths_read_both_ways_with_two_part_ids_first():
    assert [t.repo_id for t in protocol.resolve_targets(["a", "b", "resolve", "main", "f"])] == [
        "a/b"
    ]
    both = protocol.resolve_targets(["a", "resolve", "resolve", "main", "f"])
    assert [(t.repo_id, t.revision, t.path) for t in both] == [
        ("a/resolve", "main", "f"),
        ("a", "resolve", "main/f"),
    ]
    assert protocol.segments("/hf/a/b/resolve/refs%2Fpr%2F1/d/f.txt")[3] == "refs/pr/1"
    api = protocol.api_targets(["bert", "tree", "main", "sub"], "GET")
    assert [(t.repo_id, t.kind, t.revision, t.path) for t in api] == [
        ("bert", "tree", "main", "sub")
    ]
    assert protocol.api_targets(["org", "x", "paths-info", "v1"], "POST")[0].kind == "paths-info"
    assert protocol.api_targets(["org", "x", "paths-info", "v1"], "GET") == []


def test_lfs_ids_are_the_hubs():
    f = protocol.MirrorFile("w.safetensors", 5, sha256(b"hello"), None)
    pointer = lfs_pointer(f.sha256, 5)
    assert f.entry()["oid"] == hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
    assert f.entry()["lfs"] == {"oid": f.sha256, "size": 5, "pointerSize": len(pointer)}
    assert f.etag == f'"{f.sha256}"'
    plain = protocol.MirrorFile("c.json", 2, sha256(b"{}"), "0" * 40)
    assert plain.etag == f'"{"0" * 40}"' and "lfs" not in plain.entry()


def test_main_means_the_install_that_asked_for_it_else_the_newest():
    from datetime import datetime, timezone

    def revision(commit: str, names: set[str], day: int) -> protocol.RepoRevision:
        when = datetime(2026, 1, day, tzinfo=timezone.utc)
        return protocol.RepoRevision("r", commit, {}, frozenset(names), {}, when)

    old_main, new_tag = revision("a" * 40, {"main"}, 1), revision("b" * 40, {"v2"}, 2)
    assert protocol.pick_revision("r", [old_main, new_tag], "main") is old_main
    assert protocol.pick_revision("r", [old_main, new_tag], "v2") is new_tag
    assert protocol.pick_revision("r", [old_main, new_tag], "b" * 40) is new_tag
    assert protocol.pick_revision("r", [new_tag], "main") is new_tag
    with pytest.raises(protocol.RevisionNotFound):
        protocol.pick_revision("r", [old_main], "v3")


def test_a_manifest_holds_its_repository_and_its_components_and_one_commit_is_one_tree():
    from datetime import datetime

    from modelhost.spec import Component, InstallOptions, ModelSpec
    from modelhost.store.manifest import Conversion, Manifest, ManifestFile

    def file(path: str, lfs: bool = False) -> ManifestFile:
        return ManifestFile(
            path=path, size=1, sha256=sha256(path.encode()), git_sha1=None if lfs else "1" * 40
        )

    tts = Manifest(
        name="tts", source="huggingface", model_id="org/tts", revision="a" * 40,
        files=[
            file("config.json"), file("vocoder/config.json"),
            file("vocoder/model.safetensors", lfs=True),
        ],
        spec=ModelSpec(
            options=InstallOptions(source="huggingface", model_id="org/tts", revision="v1"),
            components=[
                Component(role="vocoder", repo_id="org/voc", revision="b" * 40, path="vocoder")
            ],
        ),
        conversions=[Conversion(
            original_path="vocoder/pytorch_model.bin", original_size=1, original_sha256="0" * 64,
            converted_path="vocoder/model.safetensors", converted_sha256="0" * 64,
        )],
        downloaded_at=datetime(2026, 1, 1),  # naive, as an old manifest may be
    )  # fmt: skip
    same_commit = tts.model_copy(update={"name": "tts2", "files": [file("extra.txt")]})
    other_source = tts.model_copy(update={"name": "u", "source": "url"})
    repos = protocol.by_repo([tts, same_commit, other_source])
    assert set(repos) == {"org/tts", "org/voc"}
    (main,) = repos["org/tts"]
    assert set(main.files) == {"config.json", "extra.txt"}  # the two installs, one tree
    assert protocol.pick_revision("org/tts", repos["org/tts"], "v1") is main  # recorded option
    (vocoder,) = repos["org/voc"]
    assert (vocoder.commit, set(vocoder.files)) == ("b" * 40, {"config.json", "model.safetensors"})
    assert vocoder.files["model.safetensors"].lfs and not vocoder.files["config.json"].lfs
    with pytest.raises(protocol.EntryNotFound, match="served as model.safetensors"):
        protocol.file_for(vocoder, "pytorch_model.bin")
