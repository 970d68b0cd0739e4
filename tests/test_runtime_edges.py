"""No 500 from what a client sends or a model file holds (issue 9, item 4).

Each case goes through a real server (``make_server``) with tiny real models committed into
its store, and checks the status, the message, and that nothing was left loaded.
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import struct
from pathlib import Path

import httpx
import pytest
import torch
from test_runtime import _build_gpt2
from tiny_models import build_bert, build_vits

from modelhost.runtime.weights import MAX_HEADER, MAX_TENSORS
from modelhost.store import Manifest, Store
from modelhost.store.store import CommitFile

SAFETENSORS = "model.safetensors"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("edge-models")
    return {
        "bert": build_bert(root / "bert"),
        "gpt2": _build_gpt2(root / "gpt2"),
        "vits": build_vits(root / "vits"),
    }


def install(
    home: Path, name: str, source: Path, task: str | None, replace: dict[str, bytes] | None = None
) -> Path:
    """Commit ``source``'s files into ``home``'s store as model ``name`` (as an install
    would), with the files in ``replace`` (relative path -> bytes; empty bytes: dropped)
    swapped in. Returns the staged copy's directory."""
    replace = replace or {}
    staging = home.parent / f"staging-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    for rel, data in replace.items():
        if data:
            (staging / rel).write_bytes(data)
        else:
            (staging / rel).unlink()
    files = []
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        data = file.read_bytes()
        rel = file.relative_to(staging).as_posix()
        files.append(CommitFile(rel, file, len(data), hashlib.sha256(data).hexdigest()))
    manifest = Manifest(name=name, source="huggingface", model_id=f"tests/{name}", task=task)
    Store(home).commit(manifest, files)
    return staging


def loaded_names(server) -> list[str]:
    managed = server.client.get("/models/managed").json()
    return [row["name"] for row in managed["downloaded_models"]]


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False and body["error"], body
    for fragment in fragments:
        assert fragment in body["message"], body["message"]
    return body


# --------------------------------------------------------------------------- safetensors


def _safetensors(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _real_header(file: Path) -> tuple[dict, bytes]:
    blob = file.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def _edit(file: Path, change) -> bytes:
    """The real file with its header changed by ``change(header) -> data`` (or None)."""
    header, data = _real_header(file)
    new_data = change(header)
    return _safetensors(header, data if new_data is None else new_data)


def _first(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


def _set(**fields):
    def change(header):
        _first(header).update(fields)

    return change


def _last(header: dict) -> dict:
    return max((v for k, v in header.items() if k != "__metadata__"), key=_end)


def _end(entry: dict) -> int:
    return entry["data_offsets"][1]


def _overlap(header):
    entries = sorted(
        (v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"]
    )
    # Shift the second tensor back into the first (size kept, so only the layout is wrong).
    second = entries[1]
    begin, end = second["data_offsets"]
    second["data_offsets"] = [begin - 1, end - 1]


def _out_of_bounds(header):
    entry = _last(header)
    entry["data_offsets"][1] += 4
    entry["shape"] = [entry["data_offsets"][1] - entry["data_offsets"][0]]
    entry["dtype"] = "U8"


def _many_header(header):
    header.clear()
    for i in range(MAX_TENSORS + 1):
        header[f"t{i}"] = {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]}
    return b"\x00" * (MAX_TENSORS + 1)


MALFORMED = {
    "short": (lambda f: b"\x01\x02", "too short to be a safetensors file"),
    "bad-json": (lambda f: _safetensors(b"{not json", b""), "its header is not valid JSON"),
    "not-object": (lambda f: _safetensors([1, 2], b""), "its header is not a JSON object"),
    "header-longer-than-file": (
        lambda f: _safetensors(b"{}", b"", length=4096),
        "its header claims 4096 bytes but the file has 2 after it",
    ),
    "header-over-cap": (
        lambda f: _safetensors(b"{}", b"", length=MAX_HEADER + 1),
        f"its header claims {MAX_HEADER + 1} bytes, over the 100 MB cap",
    ),
    "offsets-out-of-bounds": (lambda f: _edit(f, _out_of_bounds), "(out of bounds)"),
    "offsets-overlap": (lambda f: _edit(f, _overlap), "overlaps the tensor before it"),
    "offsets-not-dtype-times-shape": (
        lambda f: _edit(f, _set(dtype="F64")),
        "but its data_offsets span",
    ),
    "shape-not-ints": (
        lambda f: _edit(f, _set(shape=["32", 2])),
        "has a shape that is not a list of integers >= 0",
    ),
    "shape-not-list": (
        lambda f: _edit(f, _set(shape="32x2")),
        "has a shape that is not a list of integers >= 0",
    ),
    "unknown-dtype": (lambda f: _edit(f, _set(dtype="F128")), "has unknown dtype 'F128'"),
    "negative-offsets": (
        lambda f: _edit(f, _set(data_offsets=[-4, 0])),
        "has data_offsets that are not two integers >= 0",
    ),
    "missing-field": (
        lambda f: _edit(f, lambda h: _first(h).pop("dtype") and None),
        "must have exactly dtype, shape and data_offsets",
    ),
    "trailing-bytes": (
        lambda f: f.read_bytes() + b"\x00" * 8,
        "the data section is",
    ),
    "too-many-tensors": (
        lambda f: _edit(f, _many_header),
        f"it declares {MAX_TENSORS + 1} tensors, more than the limit of {MAX_TENSORS}",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_load_refuses_malformed_safetensors(make_server, built, tmp_path, case) -> None:
    make, expected = MALFORMED[case]
    home = tmp_path / "home"
    install(home, "bert", built["bert"], "text-classification",
            {SAFETENSORS: make(built["bert"] / SAFETENSORS)})  # fmt: skip
    server = make_server([], home=home, device="cpu")
    response = server.client.post("/models/bert/load", json={})
    assert_error(response, 400, f"{SAFETENSORS} is malformed: ", expected)
    assert loaded_names(server) == []
    # The model stays installed: the same name with good weights loads.
    install(home, "bert", built["bert"], "text-classification")
    assert server.client.post("/models/bert/load", json={}).status_code == 200
    assert loaded_names(server) == ["bert"]


# --------------------------------------------------------------------------- pickles


class _OpensAFile:
    """Pickles as a call to ``open`` (``io.open``): unpickling it would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_refused_by_weights_only_names_the_global(make_server, built, tmp_path) -> None:
    from transformers import BertForSequenceClassification

    marker = tmp_path / "the-pickle-ran"
    state = dict(BertForSequenceClassification.from_pretrained(built["bert"]).state_dict())
    bin_path = tmp_path / "evil.bin"
    torch.save({**state, "payload": _OpensAFile(marker)}, bin_path)
    assert not marker.exists()
    home = tmp_path / "home"
    install(home, "bert", built["bert"], "text-classification",
            {SAFETENSORS: b"", "pytorch_model.bin": bin_path.read_bytes()})  # fmt: skip
    server = make_server([], home=home, device="cpu")

    refused = server.client.post("/models/bert/load", json={})  # the policy still applies
    assert_error(refused, 400, "only pickled weights (pytorch_model.bin)", "allow_pickle=true")
    response = server.client.post("/models/bert/load", json={"allow_pickle": True})
    body = assert_error(
        response,
        400,
        "pytorch_model.bin was refused by torch.load(weights_only=True): "
        "it needs the global io.open",
    )
    assert body["error"] == "Pickled weights refused"
    assert not marker.exists()
    assert loaded_names(server) == []


# --------------------------------------------------------------------------- config size


def _huge_bert_config(source: Path) -> bytes:
    config = json.loads((source / "config.json").read_text())
    config.update(hidden_size=65536, num_hidden_layers=48, num_attention_heads=64,
                  intermediate_size=4 * 65536)  # fmt: skip
    return json.dumps(config).encode()


def test_config_declaring_more_than_the_budget_is_refused_before_allocating(
    make_server, built, tmp_path
) -> None:
    home = tmp_path / "home"
    install(home, "huge", built["bert"], "text-classification",
            {"config.json": _huge_bert_config(built["bert"])})  # fmt: skip
    install(home, "small", built["bert"], "text-classification")
    server = make_server([], home=home, device="cpu", cpu_memory_limit_gb=1.0)
    assert server.client.post("/models/small/load", json={}).status_code == 200
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    response = server.client.post("/models/huge/load", json={})

    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    from transformers import AutoModelForSequenceClassification, BertConfig

    config = BertConfig.from_dict(json.loads(_huge_bert_config(built["bert"])))
    with torch.device("meta"):
        declared = sum(
            p.numel() for p in AutoModelForSequenceClassification.from_config(config).parameters()
        )
    need_gb = declared * 4 / 1e9
    assert declared > 2 * 10**12
    assert_error(
        response,
        409,
        f"Cannot load 'huge': it needs about {need_gb:,.1f} GB",
        f"its config.json declares {declared:,} parameters",
        "more than the whole budget of cpu (1.0 GB: MODELHOST_CPU_MEMORY_LIMIT_GB)",
    )
    assert grown_mib < 300, grown_mib
    assert loaded_names(server) == ["small"]  # nothing evicted for a load that cannot fit


@pytest.mark.parametrize(
    "config, expected",
    [
        (b"{ not json", "config.json of huge is not valid JSON"),
        (b"[1, 2]", "config.json of huge is not a JSON object"),
        ({"architectures": "BertForSequenceClassification"}, "architectures must be a list"),
        ({"hidden_size": "wide"}, "config.json is not a valid model config"),
        ({"num_hidden_layers": 10**9}, "num_hidden_layers is 1000000000, over 10000"),
    ],
    ids=["not-json", "not-object", "architectures-str", "hidden-size-str", "absurd-layers"],
)
def test_bad_config_json_is_a_400_naming_it(make_server, built, tmp_path, config, expected):
    if isinstance(config, dict):
        config = json.dumps(
            {**json.loads((built["bert"] / "config.json").read_text()), **config}
        ).encode()
    home = tmp_path / "home"
    install(home, "huge", built["bert"], "text-classification", {"config.json": config})
    server = make_server([], home=home, device="cpu")
    response = server.client.post("/models/huge/load", json={})
    assert_error(response, 400, expected)
    assert loaded_names(server) == []


def test_weights_not_matching_their_config_are_a_400(make_server, built, tmp_path) -> None:
    config = json.loads((built["bert"] / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=64)  # the tiny weights are 32 wide
    home = tmp_path / "home"
    install(home, "bert", built["bert"], "text-classification",
            {"config.json": json.dumps(config).encode()})  # fmt: skip
    server = make_server([], home=home, device="cpu")
    response = server.client.post("/models/bert/load", json={})
    assert_error(response, 400, "Model files in bert could not be loaded")
    assert loaded_names(server) == []


# --------------------------------------------------------------------------- API key


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_non_ascii_authorization_is_a_401(make_server, tmp_path, encoding) -> None:
    server = make_server([], api_key="s3cret-clé", device="cpu")
    sent = "Bearer clé".encode(encoding)
    response = server.client.post("/models/x/load", headers={"Authorization": sent})
    body = assert_error(response, 401, "This server requires an API key")
    assert body["error"] == "Missing or wrong API key"
    # The key itself may be non-ASCII: its UTF-8 bytes are accepted.
    good = b"Bearer " + "s3cret-clé".encode()
    response = server.client.post("/models/x/load", headers={"Authorization": good})
    assert_error(response, 404, "Model not found in cache: x")


# --------------------------------------------------------------------------- surrogates


def _post_raw(server, path: str, raw_json: str) -> httpx.Response:
    return server.client.post(
        path, content=raw_json.encode("ascii"), headers={"content-type": "application/json"}
    )


@pytest.fixture(scope="module")
def serving(built, tmp_path_factory):
    """One server for every client-mistake case: each answers 4xx and changes nothing, so
    they share it (and each test checks the loaded models are still the same three)."""
    from conftest import RunningServer, make_settings

    home = tmp_path_factory.mktemp("edges") / "home"
    install(home, "bert", built["bert"], "text-classification")
    install(home, "gpt2", built["gpt2"], "text-generation")
    install(home, "vits", built["vits"], "text-to-speech")
    server = RunningServer(make_settings(home, [], device="cpu")).start()
    for name in ("bert", "gpt2", "vits"):
        assert server.client.post(f"/models/{name}/load", json={}).status_code == 200
    yield server
    server.stop()


@pytest.mark.parametrize(
    "path, raw, where",
    [
        ("/models/bert/predict", '{"inputs": "ok \\ud800"}', "inputs holds a lone surrogate "
         "U+D800 at character 3"),
        ("/models/bert/predict", '{"inputs": ["fine", "\\udfff"]}', "inputs.1 holds a lone"),
        ("/models/gpt2/predict", '{"inputs": "hi", "parameters": {"\\ud800": 1}}',
         "a key of parameters holds a lone surrogate U+D800"),
        ("/synthesize", '{"model_name": "vits", "text": "hello \\ud83d"}', "text holds a lone "
         "surrogate U+D83D at character 6"),
        ("/synthesize", '{"model_name": "vits", "text": "hi", "speaker": "\\udc00"}',
         "speaker holds a lone surrogate"),
    ],
)  # fmt: skip
def test_lone_surrogates_are_a_400(serving, path, raw, where) -> None:
    response = _post_raw(serving, path, raw)
    assert_error(response, 400, "input is not valid Unicode text: ", where)
    # A valid surrogate pair is one character, not an error.
    ok = _post_raw(serving, "/models/bert/predict", '{"inputs": "smile \\ud83d\\ude00"}')
    assert ok.status_code == 200, ok.text


def test_runtime_text_check_refuses_lone_surrogates() -> None:
    from modelhost.runtime.compute.inputs import check_text
    from modelhost.runtime.errors import InvalidInput

    with pytest.raises(InvalidInput, match="text is not valid Unicode text: a lone surrogate"):
        check_text("ab\ud800")


# --------------------------------------------------------------------------- sweep


@pytest.mark.parametrize(
    "path, body, status, expected",
    [
        ("/models/bert/predict", {"inputs": []}, 400, "inputs must be a non-empty string"),
        ("/models/bert/predict", {"inputs": 5}, 400, "inputs must be a non-empty string"),
        ("/models/bert/predict", {"inputs": [1, 2]}, 400, "inputs[0] must be a non-empty"),
        ("/models/bert/predict", {"inputs": {"image": "x"}}, 400, "inputs must be a non-empty"),
        ("/models/bert/predict", {"inputs": "x", "parameters": {"top_k": "2"}}, 400,
         "parameter top_k must be an integer from 1 to 2"),
        ("/models/gpt2/predict", {"inputs": "hi", "parameters": {"max_new_tokens": 10**12}},
         400, "parameter max_new_tokens must be an integer from 1 to 4096"),
        ("/models/gpt2/predict", {"inputs": "hi", "parameters": {"max_new_tokens": 2000}},
         400, "parameter max_new_tokens must be at most 1024"),
        ("/models/gpt2/predict", {"inputs": ["a", "b"]}, 400, "inputs must be a non-empty str"),
        ("/models/gpt2/predict", {"inputs": "hi", "parameters": {"temperature": "hot"}}, 400,
         "parameter temperature must be a number"),
        ("/models/gpt2/predict", {"inputs": "hi", "parameters": "x"}, 422,
         "parameters: Input should be a valid dictionary"),
        ("/synthesize", {"model_name": "vits", "text": "hi", "max_new_tokens": 10**9}, 422,
         "max_new_tokens: Input should be less than or equal to 2048"),
        ("/synthesize", {"model_name": "vits", "text": "hi", "seed": 10**30}, 422,
         "seed: Input should be less than or equal to 9007199254740991"),
        ("/synthesize", {"model_name": "vits", "text": "hi", "speaker": [1.5]}, 400,
         "this VITS model has a single speaker: omit speaker"),
        ("/synthesize", {"model_name": "vits", "text": 7}, 422, "text: Input should be a "
         "valid string"),
        ("/synthesize", {"model_name": "bert", "text": "hi"}, 400, "not a text-to-speech model"),
        ("/models/vits/predict", {"inputs": "hi"}, 400, "is text-to-speech: use synthesize"),
        ("/models/bert/load", {"device": "tpu"}, 400, "invalid device 'tpu'"),
        ("/models/bert/load", {"device": "cuda:x"}, 400, "invalid device 'cuda:x'"),
        ("/models/bert/load", {"device": "cuda:99"}, 409, "device 'cuda:99'"),
        ("/models/bert/load", {"device": 5}, 422, "device: Input should be a valid string"),
    ],
)  # fmt: skip
def test_client_mistakes_are_4xx(serving, path, body, status, expected) -> None:
    response = serving.client.post(path, json=body)
    assert_error(response, status, expected)
    assert sorted(loaded_names(serving)) == ["bert", "gpt2", "vits"]
