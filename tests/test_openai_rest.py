"""OpenAI's REST contract on /v1 through the real ``openai`` client: models, embeddings
(equal to sentence-transformers on the real all-MiniLM-L6-v2, batched across concurrent
requests), transcriptions (equal to the transformers ASR pipeline on tiny Whisper models, in
every response_format), the error shape, and the API key."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile
import tiny_models
from conftest import RunningServer, make_settings
from tiny_models import build_whisper, minilm_dir

RATE = 16_000
TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog, again and again and again.",
    "a",
    "Embeddings turn text into vectors.",
]


def build_whisper_with_timestamps(directory: Path) -> Path:
    """The tiny Whisper of ``tiny_models.build_whisper`` plus Whisper's 1501 timestamp tokens
    (<|0.00|> ... <|30.00|>) after <|notimestamps|>: generate can return timestamps."""
    from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

    build_whisper(directory)
    processor = WhisperProcessor.from_pretrained(directory)
    stamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    processor.tokenizer.add_tokens(stamps)
    tiny_models._torch_seed()
    model = WhisperForConditionalGeneration.from_pretrained(directory)
    model.resize_token_embeddings(len(processor.tokenizer))
    config = model.generation_config.to_dict()
    config["max_length"] = 24
    model.generation_config = GenerationConfig(**config)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def tone(seconds: float, rate: int = RATE, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1250 * t)
    wave = wave.astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def encoded(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def install(server: RunningServer, path: Path, name: str, task: str) -> None:
    body = {"source": "local", "model_id": str(path), "name": name, "task": task}
    response = server.client.post("/models/download", json=body)
    assert response.status_code == 202, response.text
    status = server.wait_for(response.json()["download_id"], timeout=180)
    assert status["status"] == "completed", status


@pytest.fixture(scope="module")
def whisper_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("whispers")
    return {
        "whisper": build_whisper(root / "whisper"),
        "whisper-ts": build_whisper_with_timestamps(root / "whisper-ts"),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, whisper_dirs):
    """One server for the module: MiniLM and the two tiny Whispers installed and loaded."""
    home = tmp_path_factory.mktemp("home")
    roots = (minilm_dir().parent, next(iter(whisper_dirs.values())).parent)
    running = RunningServer(make_settings(home, [], import_roots=roots, device="cpu")).start()
    install(running, minilm_dir(), "minilm", "feature-extraction")
    for name, path in whisper_dirs.items():
        install(running, path, name, "automatic-speech-recognition")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu")


# --------------------------------------------------------------------------- models


def test_models_list_and_retrieve(server, client):
    manifests = {
        m["name"]: m for m in server.client.get("/models/cache/info").json()["installed_models"]
    }
    listed = client.models.list()
    assert (
        sorted(m.id for m in listed.data)
        == sorted(manifests)
        == [
            "minilm",
            "whisper",
            "whisper-ts",
        ]
    )
    now = time.time()
    for model in listed.data:
        assert model.object == "model" and model.owned_by == "local"
        assert now - 600 < model.created <= now
    one = client.models.retrieve("minilm")
    assert (one.id, one.object, one.owned_by) == ("minilm", "model", "local")
    # An installed model that is not loaded is listed too.
    assert server.client.post("/models/whisper-ts/unload").status_code == 200
    try:
        assert "whisper-ts" in {m.id for m in client.models.list().data}
    finally:
        assert server.client.post("/models/whisper-ts/load").status_code == 200


def test_unknown_model_is_openai_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.status_code == 404
    assert caught.value.message == f"Error code: 404 - {caught.value.body['message']}"
    assert caught.value.body["message"].startswith("The model 'no-such-model' does not exist")
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError, match="'ghost' does not exist"):
        client.embeddings.create(model="ghost", input="hi")
    with pytest.raises(openai.NotFoundError, match="'ghost' does not exist"):
        client.audio.transcriptions.create(
            model="ghost", file=("a.wav", encoded(tone(1), RATE, "WAV"), "audio/wav")
        )


# --------------------------------------------------------------------------- embeddings


def test_embeddings_equal_sentence_transformers(client, reference):
    expected = reference.encode(TEXTS, convert_to_numpy=True)
    default = client.embeddings.create(model="minilm", input=TEXTS)  # base64 on the wire
    floats = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    for result in (default, floats):
        assert result.model == "minilm" and result.object == "list"
        assert [d.index for d in result.data] == list(range(len(TEXTS)))
        got = np.array([d.embedding for d in result.data])
        assert got.shape == (4, 384)
        assert np.abs(got - expected).max() < 1e-5
    # The same float32 values either way: base64 is their little-endian bytes.
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    tokens = sum(len(reference.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert default.usage.prompt_tokens == default.usage.total_tokens == tokens


def test_embeddings_wire_format(server, reference):
    body = {"model": "minilm", "input": "hello world", "encoding_format": "base64"}
    raw = server.client.post("/v1/embeddings", json=body)
    assert raw.status_code == 200, raw.text
    item = raw.json()["data"][0]
    assert item["object"] == "embedding" and item["index"] == 0
    vector = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
    assert np.abs(vector - reference.encode("hello world")).max() < 1e-5
    # [CLS] hello world [SEP]
    assert raw.json()["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    ok = server.client.post("/v1/embeddings", json={**body, "dimensions": 384, "user": "someone"})
    assert ok.status_code == 200, ok.text


def test_embeddings_over_the_per_work_chunk(client, reference):
    texts = [f"sentence number {i}" for i in range(150)]  # 3 chunks of at most 64
    result = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    got = np.array([d.embedding for d in result.data])
    assert got.shape == (150, 384)
    assert np.abs(got - reference.encode(texts)).max() < 1e-5


def test_concurrent_embeddings_are_batched(server, client, reference):
    response = server.client.post(
        "/models/minilm/load", json={"max_batch_size": 32, "max_batch_delay_ms": 50}
    )
    assert response.status_code == 200, response.text
    loaded = server.server.config.app.state.services.runtime.get("minilm", touch=False)
    before = _row(server)
    results: dict[int, list[float]] = {}

    def call(i: int) -> None:
        out = client.embeddings.create(model="minilm", input=TEXTS[i], encoding_format="float")
        results[i] = out.data[0].embedding

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(TEXTS))]
    with loaded.lock:  # the worker's first forward waits here: the others queue behind it
        for thread in threads:
            thread.start()
        # Every request reached the server and is in flight (queued on the worker, or
        # taken into the batch that waits for the lock); then give the worker's batch
        # window (50 ms) time to close before the forward may run.
        deadline = time.monotonic() + 30
        while _row(server)["inflight"] < len(TEXTS) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
    for thread in threads:
        thread.join(timeout=60)
    after = _row(server)
    for i, text in enumerate(TEXTS):
        assert np.abs(np.array(results[i]) - reference.encode(text)).max() < 1e-5
    assert after["items_run"] - before["items_run"] == len(TEXTS)
    # Four requests in at most two forwards (the first may have left alone), one of >= 3.
    assert after["batches_run"] - before["batches_run"] <= 2
    assert after["largest_batch"] >= len(TEXTS) - 1


def _row(server) -> dict:
    rows = server.client.get("/models/managed").json()["downloaded_models"]
    return next(r for r in rows if r["name"] == "minilm")


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({"input": [101, 2023, 102]}, "input", "token ids is not supported"),
        ({"input": [[101, 102]]}, "input", "token ids is not supported"),
        ({"input": []}, "input", "non-empty list"),
        ({"input": ["ok", ""]}, "input", "input[1] must be a non-empty string"),
        ({"input": ["x"] * 2049}, "input", "at most 2048"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
        ({"input": "hi", "dimensions": 64}, "dimensions", "384-dimensional"),
        ({"input": "hi", "dimensions": "64"}, "dimensions", "positive integer"),
        ({"input": "hi", "colour": "red"}, "colour", "Extra inputs are not permitted"),
        ({}, "input", "Field required"),
        ({"input": "hi", "model": "whisper"}, "model", "serves automatic-speech-recognition"),
        ({"input": "hi", "model": "../etc"}, "model", "Invalid model name"),
    ],
)
def test_embeddings_bad_requests_are_openai_400s(server, client, body, param, fragment):
    before = _row(server)["items_run"]
    response = server.client.post("/v1/embeddings", json={"model": "minilm", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in error["message"]
    assert _row(server)["items_run"] == before  # nothing ran
    if "input" not in body:
        return  # the client itself refuses to send it
    known = {k: v for k, v in body.items() if k in ("input", "model", "encoding_format")}
    extra = {k: v for k, v in body.items() if k not in known}
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(**{"model": "minilm", **known}, extra_body=extra)
    assert fragment in caught.value.message


# --------------------------------------------------------------------------- transcriptions


def _pipeline(path: Path, samples: np.ndarray, **kwargs) -> dict:
    from transformers import pipeline

    return pipeline("automatic-speech-recognition", model=str(path))(samples.copy(), **kwargs)


@pytest.fixture(scope="module")
def clip() -> tuple[bytes, np.ndarray]:
    """Two seconds of 16 kHz tones as a 16-bit WAV, and the samples a decoder reads back."""
    data = encoded(tone(2.0), RATE, "WAV", "PCM_16")
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert rate == RATE
    return data, samples


def test_transcription_formats_equal_the_pipeline(client, whisper_dirs, clip):
    data, samples = clip
    expected = _pipeline(whisper_dirs["whisper"], samples)["text"].strip()
    assert expected  # random weights still emit tokens

    def create(fmt: str | None):
        extra = {"response_format": fmt} if fmt else {}
        return client.audio.transcriptions.create(
            model="whisper", file=("clip.wav", data, "audio/wav"), **extra
        )

    default = create(None)  # json is the default
    assert default.text == expected and default.usage.seconds == 2.0
    assert create("json").text == expected
    assert create("text") == expected + "\n"
    verbose = create("verbose_json")
    assert (verbose.text, verbose.language, verbose.duration) == (expected, "english", 2.0)
    # This model has no timestamp tokens: one segment, the whole clip.
    assert len(verbose.segments) == 1
    segment = verbose.segments[0]
    assert (segment.id, segment.start, segment.end, segment.text) == (0, 0.0, 2.0, expected)
    assert verbose.usage.seconds == 2.0
    assert verbose.model_extra["timestamps"] == "whole-clip"
    assert create("srt") == f"1\n00:00:00,000 --> 00:00:02,000\n{expected}\n\n"
    assert create("vtt") == f"WEBVTT\n\n00:00:00.000 --> 00:00:02.000\n{expected}\n\n"


def test_transcription_segments_from_timestamp_tokens(client, whisper_dirs):
    seconds = 29.5  # most of the window: the random model's timestamps fall inside it
    data = encoded(tone(seconds), RATE, "FLAC", "PCM_16")
    samples, _ = soundfile.read(io.BytesIO(data), dtype="float32")  # what a decoder reads
    expected = _pipeline(whisper_dirs["whisper-ts"], samples, return_timestamps=True)
    chunks = [
        (min(c["timestamp"][0], seconds), min(c["timestamp"][1], seconds), c["text"])
        for c in expected["chunks"]
    ]
    assert len(chunks) >= 2 and chunks[0][1] < seconds
    verbose = client.audio.transcriptions.create(
        model="whisper-ts", file=("clip.flac", data, "audio/flac"), response_format="verbose_json"
    )
    assert verbose.model_extra["timestamps"] == "whisper"
    assert verbose.text == expected["text"].strip()
    got = [(s.start, s.end, s.text) for s in verbose.segments]
    assert got == [(round(a, 3), round(b, 3), t) for a, b, t in chunks]
    srt = client.audio.transcriptions.create(
        model="whisper-ts", file=("clip.flac", data, "audio/flac"), response_format="srt"
    )
    cues = srt.strip("\n").split("\n\n")
    assert len(cues) == len(chunks)
    first = cues[0].split("\n")
    assert first[0] == "1" and " --> " in first[1]
    vtt = client.audio.transcriptions.create(
        model="whisper-ts", file=("clip.flac", data, "audio/flac"), response_format="vtt"
    )
    assert vtt.startswith("WEBVTT\n\n") and vtt.count(" --> ") == len(chunks)


def test_transcription_decodes_other_formats(server, client, whisper_dirs):
    from modelhost.audio.encode import encode_audio

    for name, data in [
        ("clip.mp3", encode_audio(tone(2.0), RATE, "mp3")),
        ("clip.ogg", encode_audio(tone(2.0), RATE, "opus")),
        ("stereo.wav", encoded(tone(2.0, 44_100, channels=2), 44_100, "WAV", "PCM_16")),
    ]:
        verbose = client.audio.transcriptions.create(
            model="whisper", file=(name, data), response_format="verbose_json"
        )
        # Codec padding moves the end by a few ms at most.
        assert abs(verbose.duration - 2.0) < 0.1, (name, verbose.duration)


@pytest.mark.parametrize(
    "form, kwargs",
    [({"prompt": "hello world"}, "prompt"), ({"language": "en"}, {"language": "en"})],
)
def test_transcription_prompt_and_language_reach_generate(client, whisper_dirs, clip, form, kwargs):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    data, samples = clip
    path = whisper_dirs["whisper"]
    model = WhisperForConditionalGeneration.from_pretrained(path).eval()
    processor = WhisperProcessor.from_pretrained(path)
    features = processor.feature_extractor(
        samples, sampling_rate=RATE, return_tensors="pt", return_attention_mask=True
    )
    if kwargs == "prompt":
        kwargs = {"prompt_ids": processor.get_prompt_ids(form["prompt"], return_tensors="pt")}
    tokens = model.generate(
        input_features=features.input_features,
        attention_mask=features.attention_mask,
        num_beams=5,  # the pipeline's default, as the server's (this model sets max_length)
        **kwargs,
    )
    expected = processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()
    plain = _pipeline(path, samples)["text"].strip()
    assert expected != plain  # the option changes the transcript of this model
    got = client.audio.transcriptions.create(model="whisper", file=("clip.wav", data), **form)
    assert got.text == expected


def test_transcription_options(client, clip):
    data, _ = clip
    text = client.audio.transcriptions.create(
        model="whisper",
        file=("clip.wav", data),
        language="en",
        prompt="hello world",
        temperature=0.5,
        response_format="verbose_json",
    )
    assert text.language == "english" and text.segments[0].temperature == 0.5


@pytest.mark.parametrize(
    "fields, file, param, fragment, status",
    [
        ({}, ("a.wav", b"RIFF" + b"\0" * 400), "file", "could not decode", 400),
        ({}, ("a.txt", b"just some text, not audio at all"), "file", "could not decode", 400),
        ({}, "long", "file", "longer than 30 s", 400),
        ({"response_format": "xml"}, None, "response_format", "one of json", 400),
        ({"temperature": "2"}, None, "temperature", "from 0 to 1", 400),
        ({"temperature": "warm"}, None, "temperature", "from 0 to 1", 400),
        ({"language": "klingon"}, None, "language", "klingon", 400),
        ({"model": "minilm"}, None, "model", "serves feature-extraction", 400),
        ({"colour": "red"}, None, "colour", "unknown field", 400),
        ({"stream": "true"}, None, "stream", "not built", 501),
        ({"timestamp_granularities[]": "word"}, None, "timestamp_granularities[]", "word", 501),
    ],
)
def test_transcription_bad_requests(server, clip, fields, file, param, fragment, status):
    data, _ = clip
    if file == "long":
        file = ("long.wav", encoded(tone(31.0), RATE, "WAV", "PCM_16"))
    files = {"file": file or ("clip.wav", data, "audio/wav")}
    form = {"model": "whisper", **fields}
    response = server.client.post("/v1/audio/transcriptions", data=form, files=files)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    kind = "server_error" if status == 501 else "invalid_request_error"
    assert (error["param"], error["type"]) == (param, kind)
    assert fragment in error["message"]


def test_transcription_upload_over_25_mb_is_413(server, client):
    big = b"\0" * (25 * 1000 * 1000 + 100 * 1024)
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.transcriptions.create(model="whisper", file=("big.wav", big))
    assert caught.value.status_code == 413
    assert caught.value.body["param"] == "file"
    assert "at most 25000000" in caught.value.body["message"]


def send_chunked_upload(port: int, total: int) -> tuple[int, bytes]:
    """POST a multipart upload of ``total`` zero bytes in chunked encoding (no
    Content-Length), 1 MB a chunk, until sent or the server closes; returns the bytes the
    client got to send and the server's answer."""
    boundary = "modelhostboundary"
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    chunk = b"\0" * 1_000_000
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    sent = 0
    try:
        for data in [head, *[chunk] * (total // len(chunk)), f"\r\n--{boundary}--\r\n".encode()]:
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
            sent += len(data)
        sock.sendall(b"0\r\n\r\n")
    except OSError:  # the server answered and closed: the rest was never read
        pass
    answer = b""
    try:
        while part := sock.recv(65536):
            answer += part
    except OSError:
        pass
    sock.close()
    return sent, answer


def test_chunked_upload_over_the_limit_is_refused_before_it_is_read(server):
    """Without Content-Length the limit holds too: the server answers 413 once the body
    passes 25 MB, and stops reading it (the client cannot send the 200 MB it meant to)."""
    sent, answer = send_chunked_upload(server.port, 200_000_000)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    # What passed the limit is at most what the sockets' buffers held when it answered.
    assert sent < 60_000_000, sent
    assert b"the file may have at most 25000000" in answer
    assert server.client.get("/health").status_code == 200


def test_transcription_needs_file_and_model(server, clip):
    data, _ = clip
    missing_file = server.client.post(
        "/v1/audio/transcriptions", data={"model": "whisper"}, files={"other": ("x", b"x")}
    )
    assert missing_file.status_code == 400
    no_file = server.client.post("/v1/audio/transcriptions", data={"model": "whisper"})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    no_model = server.client.post("/v1/audio/transcriptions", files={"file": ("clip.wav", data)})
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"


# --------------------------------------------------------------------------- conventions


def test_unknown_routes_and_methods_under_v1(server):
    missing = server.client.get("/v1/chat/completions")
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["code"] == "unknown_url" and "POST /v1/embeddings" in error["message"]
    assert error["message"].startswith("Invalid URL (GET /v1/chat/completions)")
    wrong = server.client.get("/v1/embeddings")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["message"].endswith("use POST")
    not_json = server.client.post(
        "/v1/embeddings", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]


def test_model_not_loaded_is_a_conflict_naming_model(server, client, monkeypatch):
    # With on-demand loading off; on, the request loads it (test_model_loads_on_demand).
    settings = server.server.config.app.state.services.settings
    monkeypatch.setattr(settings, "load_on_demand", False)
    assert server.client.post("/models/whisper-ts/unload").status_code == 200
    try:
        with pytest.raises(openai.ConflictError) as caught:
            client.audio.transcriptions.create(
                model="whisper-ts", file=("a.wav", encoded(tone(1), RATE, "WAV"))
            )
        assert "POST /models/whisper-ts/load" in caught.value.message
        assert "modelhost load whisper-ts" in caught.value.message
        assert caught.value.body["param"] == "model"
    finally:
        assert server.client.post("/models/whisper-ts/load").status_code == 200


def test_model_loads_on_demand(server, client):
    assert server.client.post("/models/whisper-ts/unload").status_code == 200
    try:
        text = client.audio.transcriptions.create(
            model="whisper-ts",
            file=("a.wav", encoded(tone(1), RATE, "WAV")),
            response_format="text",
            extra_body={"keep_alive": "10m"},
        )
        assert isinstance(text, str)
        rows = server.client.get("/models/managed").json()["downloaded_models"]
        row = next(r for r in rows if r["name"] == "whisper-ts")
        assert row["keep_alive_s"] == 600 and row["load_count"] >= 2
    finally:
        assert server.client.post("/models/whisper-ts/load").status_code == 200


def test_api_key(tmp_path):
    settings = make_settings(tmp_path / "home", [], api_key="s3cret", device="cpu")
    running = RunningServer(settings).start()
    try:
        base = f"{running.base_url}/v1"
        for key in ("wrong", ""):
            bad = openai.OpenAI(base_url=base, api_key=key or "x", max_retries=0)
            if not key:
                bad = openai.OpenAI(
                    base_url=base, api_key="x", max_retries=0, default_headers={"Authorization": ""}
                )
            with pytest.raises(openai.AuthenticationError) as caught:
                bad.models.list()
            assert "MODELHOST_API_KEY" in caught.value.message
            assert caught.value.body["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0)
        assert good.models.list().data == []
        raw = httpx.post(f"{base}/embeddings", json={"model": "m", "input": "x"})
        assert raw.status_code == 401 and raw.json()["error"]["type"] == "authentication_error"
    finally:
        running.stop()


def test_guard_refusal_is_openai_shaped_on_v1(server):
    refused = server.client.get("/v1/models", headers={"host": "evil.example"})
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["type"] == "permission_error" and "MODELHOST_ALLOWED_HOSTS" in error["message"]
    # modelhost's own routes keep modelhost's body.
    own = server.client.get("/models", headers={"host": "evil.example"})
    assert own.status_code == 403 and own.json()["success"] is False


def test_decoding_damaged_files_only_ever_answers_invalid_input():
    """Seeded mutations of real files (truncated, bytes changed, noise): each decodes or is
    an InvalidInput (400), never another exception (a 500). This found metadata in broken
    UTF-8 and a stream whose frames change format mid-way."""
    import random

    from modelhost.audio.encode import encode_audio
    from modelhost.runtime.decode import decode_audio
    from modelhost.runtime.errors import InvalidInput

    originals = [
        encoded(tone(1.0), RATE, "WAV", "PCM_16"),
        encoded(tone(1.0), RATE, "FLAC"),
        encode_audio(tone(1.0), RATE, "mp3"),
        encode_audio(tone(1.0), RATE, "opus"),
        encode_audio(tone(1.0), RATE, "aac"),
    ]
    rng = random.Random(0)
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(400):
        data = bytearray(rng.choice(originals))
        roll = rng.random()
        if roll < 0.3:
            data = data[: rng.randrange(1, len(data))]
        elif roll < 0.8:
            for _ in range(rng.randrange(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            data = bytearray(rng.randbytes(rng.randrange(1, 2000)))
        try:
            samples = decode_audio(bytes(data), RATE, 30.0)
        except InvalidInput:
            outcomes["refused"] += 1
        else:
            assert samples.dtype == np.float32 and samples.ndim == 1 and samples.size > 0
            outcomes["decoded"] += 1
    assert outcomes["decoded"] > 50 and outcomes["refused"] > 50, outcomes
