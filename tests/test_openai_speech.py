"""POST /v1/audio/speech through the real openai client: every format decoded by an
independent decoder and compared with /synthesize, speed without pitch change, voices,
streaming before the last sentence, a disconnect that stops the synthesis, concurrent
streams that never mix, SSE events, and the errors a client can act on.

Models: the tiny VITS (deterministic with a seed) and a 3-speaker tiny VITS, imported with
the local source; Bark and SpeechT5 voices are checked on models loaded in-process.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import av
import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import torch
from conftest import RunningServer, make_settings
from scipy.signal import resample_poly
from tiny_models import build_bark, build_hifigan, build_speecht5, build_vits

from modelhost.audio.encode import StreamEncoder, encode_audio
from modelhost.audio.speech import (
    OPENAI_VOICES,
    add_sentence_listener,
    apply_speed,
    resolve_voice,
    sentence_seed,
    tempo_factors,
)
from modelhost.runtime.inference import synthesize
from modelhost.runtime.loaders import load
from modelhost.store.manifest import Manifest

RATE = 16_000  # the tiny VITS's sampling_rate
TWO = "Hello there, my friend. How are you today?"
TWO_PARTS = ["Hello there, my friend.", "How are you today?"]
MANY = " ".join(f"Sentence number {w} is here." for w in "one two three four five six".split())
MANY += " " + " ".join(f"And {w} follows it." for w in "seven eight nine ten eleven".split())
N_MANY = 11
KEY = "test-key"


def quieted(directory):
    """The tiny VITS with its last convolution scaled down 50x. Random weights drive its
    tanh output into clipping (90% of samples at +-1: a square-ish noise no lossy codec can
    be judged on); scaled, its audio peaks unclipped with an RMS near 0.36."""
    from transformers import VitsModel

    model = VitsModel.from_pretrained(directory)
    with torch.no_grad():
        model.decoder.conv_post.weight.mul_(0.02)  # it has no bias
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One modelhost with "vits" (one speaker) and "vits3" (three) installed and loaded."""
    root = tmp_path_factory.mktemp("speech-imports")
    quieted(build_vits(root / "vits"))
    quieted(build_vits(root / "vits3", num_speakers=3, speaker_embedding_size=8))
    home = tmp_path_factory.mktemp("speech-home")
    settings = make_settings(home, [], import_roots=(root,), device="cpu", api_key=KEY)
    running = RunningServer(settings).start()
    running.client.headers["Authorization"] = f"Bearer {KEY}"
    for name in ("vits", "vits3"):
        body = {"source": "local", "model_id": str(root / name), "name": name}
        response = running.client.post("/models/download", json=body)
        assert response.status_code == 202, response.text
        status = running.wait_for(response.json()["download_id"], timeout=120)
        assert status["status"] == "completed", status
    yield running
    running.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)


def speak(client, **kwargs) -> bytes:
    kwargs.setdefault("model", "vits")
    kwargs.setdefault("voice", "alloy")
    seed = kwargs.pop("seed", None)
    extra = {"extra_body": {"seed": seed}} if seed is not None else {}
    return client.audio.speech.create(**kwargs, **extra).content


def reference(server, parts: list[str], seed: int, speaker=None) -> np.ndarray:
    """/synthesize's int16 samples for each sentence (sentence i with seed + i), joined."""
    out = []
    for i, text in enumerate(parts):
        model = "vits" if speaker is None else "vits3"
        body = {"model_name": model, "text": text, "seed": seed + i}
        if speaker is not None:
            body["speaker"] = speaker
        response = server.client.post("/synthesize", json=body)
        assert response.status_code == 200, response.text
        samples, rate = sf.read(io.BytesIO(response.content), dtype="int16")
        assert rate == RATE
        out.append(samples)
    return np.concatenate(out)


def envelope(samples: np.ndarray, frame: int) -> np.ndarray:
    """RMS per ``frame`` samples: what a lossy codec keeps of noise-like tiny-model audio."""
    samples = np.asarray(samples, dtype=np.float64)
    n = len(samples) // frame
    return np.sqrt((samples[: n * frame].reshape(n, frame) ** 2).mean(axis=1))


def best_lag(decoded: np.ndarray, ref: np.ndarray, max_lag: int = 3000) -> int:
    """The codec's delay: the shift of ``decoded`` that best lines it up with ``ref``."""
    n = len(ref) - max_lag
    scores = [np.dot(decoded[k : k + n], ref[:n]) for k in range(max_lag)]
    return int(np.argmax(scores))


def close_lossy(decoded: np.ndarray, ref: np.ndarray, rate: int) -> None:
    """Within codec tolerance, once aligned (the codec's delay: mp3 1105, aac 1024, opus 0
    samples): the same length within one 2048-sample codec frame, the 20 ms RMS envelope
    correlated > 0.9, the waveform > 0.6 (measured: mp3 0.73, opus 0.94, aac 0.996; another
    seed's audio correlates near 0) and the RMS level within -40%..+25%."""
    lag = best_lag(decoded, ref)
    aligned = decoded[lag:]
    assert abs(len(aligned) - len(ref)) < 2048, (len(aligned), len(ref), lag)
    n = min(len(aligned), len(ref))
    a, r = aligned[:n], ref[:n]
    wave_corr = np.corrcoef(a, r)[0, 1]
    env_corr = np.corrcoef(envelope(a, rate // 50), envelope(r, rate // 50))[0, 1]
    level = np.sqrt((a**2).mean() / (r**2).mean())
    assert wave_corr > 0.6, wave_corr
    assert env_corr > 0.9, env_corr
    assert 0.6 < level < 1.25, level


# --------------------------------------------------------------------------- formats


def test_wav_pcm_flac_equal_synthesize(server, client):
    ref = reference(server, TWO_PARTS, seed=11)
    wav = speak(client, input=TWO, response_format="wav", seed=11)
    assert wav[:4] == b"RIFF" and wav[40:44] == b"\xff\xff\xff\xff"  # streamed: size unknown
    samples, rate = sf.read(io.BytesIO(wav), dtype="int16")
    assert rate == RATE and np.array_equal(samples, ref)

    flac = speak(client, input=TWO, response_format="flac", seed=11)
    samples, rate = sf.read(io.BytesIO(flac), dtype="int16")
    assert rate == RATE and np.array_equal(samples, ref)

    pcm = np.frombuffer(speak(client, input=TWO, response_format="pcm", seed=11), "<i2")
    # 24 kHz. The reference (16-bit, as /synthesize's WAV carries it) through the same
    # resampler is within one 16-bit step (the stream resamples the model's floats, before
    # their rounding); scipy's independent polyphase resampler correlates above 0.97.
    same_way = np.frombuffer(encode_audio(ref / 32767.0, RATE, "pcm"), "<i2")
    assert len(pcm) == len(same_way)
    assert np.abs(pcm.astype(np.int32) - same_way).max() <= 1
    independent = resample_poly(ref.astype(np.float64), 3, 2)
    assert abs(len(pcm) - len(independent)) <= 2
    n = min(len(pcm), len(independent))
    assert np.corrcoef(pcm[:n], independent[:n])[0, 1] > 0.97


@pytest.mark.parametrize("fmt", ["mp3", "opus"])
def test_lossy_formats_decode_close_to_synthesize(server, client, fmt):
    ref = reference(server, TWO_PARTS, seed=5).astype(np.float64) / 32767.0
    data = speak(client, input=TWO, response_format=fmt, seed=5)
    decoded, rate = sf.read(io.BytesIO(data), dtype="float64")  # libsndfile: mp3, ogg opus
    assert rate == RATE
    close_lossy(decoded, ref, rate)


def test_aac_decodes_close_to_synthesize(server, client):
    ref = reference(server, TWO_PARTS, seed=5).astype(np.float64) / 32767.0
    data = speak(client, input=TWO, response_format="aac", seed=5)
    # libsndfile reads no AAC: PyAV's (FFmpeg's) native decoder, a different code path from
    # the encoder used to write it.
    with av.open(io.BytesIO(data), format="aac") as container:
        rate = container.streams.audio[0].rate
        decoded = np.concatenate(
            [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
        ).astype(np.float64)
    assert rate == RATE
    close_lossy(decoded, ref, rate)


def test_content_types_and_default_format(server):
    expected = {
        "mp3": "audio/mpeg",
        "opus": "audio/ogg",
        "aac": "audio/aac",
        "flac": "audio/flac",
        "wav": "audio/wav",
        "pcm": "audio/pcm",
    }
    for fmt, media_type in expected.items():
        body = {"model": "vits", "input": "hi there.", "response_format": fmt}
        response = server.client.post("/v1/audio/speech", json=body)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == media_type
    response = server.client.post("/v1/audio/speech", json={"model": "vits", "input": "hi."})
    assert response.headers["content-type"] == "audio/mpeg"
    assert response.content[:3] == b"ID3" or response.content[0] == 0xFF


# --------------------------------------------------------------------------- speed


def test_speed_two_halves_the_duration(server, client):
    text = "A rather long sentence that gives the tempo filter enough audio to work with."
    normal = speak(client, input=text, response_format="wav", seed=2)
    fast = speak(client, input=text, response_format="wav", seed=2, speed=2.0)
    slow = speak(client, input=text, response_format="wav", seed=2, speed=0.5)
    n_normal, n_fast, n_slow = (len(sf.read(io.BytesIO(b))[0]) for b in (normal, fast, slow))
    assert n_fast / n_normal == pytest.approx(0.5, rel=0.04)
    assert n_slow / n_normal == pytest.approx(2.0, rel=0.04)


@pytest.mark.parametrize("speed", [0.25, 0.5, 2.0, 3.0, 4.0])
def test_tempo_keeps_the_pitch(speed):
    rate = 16_000
    t = np.arange(rate * 2) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    out = apply_speed(tone, rate, speed)
    assert len(out) / len(tone) == pytest.approx(1 / speed, rel=0.02)
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    dominant = np.fft.rfftfreq(len(out), 1 / rate)[int(np.argmax(spectrum))]
    assert dominant == pytest.approx(440.0, abs=rate / len(out) + 1.0)


def test_tempo_factors_chain_within_atempo_limits():
    for speed in (0.25, 0.3, 0.5, 1.0, 1.7, 2.0, 3.0, 4.0):
        factors = tempo_factors(speed)
        assert all(0.5 <= f <= 2.0 for f in factors)
        assert np.prod(factors) == pytest.approx(speed)
    assert tempo_factors(4.0) == [2.0, 2.0] and tempo_factors(0.25) == [0.5, 0.5]
    assert np.array_equal(apply_speed(np.ones(10, np.float32), RATE, 1.0), np.ones(10))


# --------------------------------------------------------------------------- voices


def test_voices_listed_and_openai_names_mapped(server, client):
    listed = server.client.get("/v1/audio/voices", params={"model": "vits3"}).json()
    assert listed["voices"] == ["0", "1", "2"] and listed["default"] == "0"
    assert listed["openai_voices"]["alloy"] == "0"
    assert listed["openai_voices"]["ash"] == "1"
    assert listed["openai_voices"]["ballad"] == "2"
    assert listed["openai_voices"]["coral"] == "0"
    assert set(listed["openai_voices"]) == set(OPENAI_VOICES)
    assert server.client.get("/models/vits3/voices").json() == listed
    single = server.client.get("/models/vits/voices").json()
    assert single["voices"] == ["default"]
    assert set(single["openai_voices"].values()) == {"default"}

    text = "Speak with speaker one."
    ref = reference(server, [text], seed=4, speaker=1)
    for voice in ("1", "ash", {"id": "1"}):
        wav = speak(client, model="vits3", input=text, voice=voice, response_format="wav", seed=4)
        assert np.array_equal(sf.read(io.BytesIO(wav), dtype="int16")[0], ref), voice
    other = speak(client, model="vits3", input=text, voice="2", response_format="wav", seed=4)
    other_samples = sf.read(io.BytesIO(other), dtype="int16")[0]
    assert other_samples.shape != ref.shape or not np.array_equal(other_samples, ref)


def test_unknown_voice_lists_the_valid_ones(client):
    with pytest.raises(openai.BadRequestError) as caught:
        speak(client, model="vits3", input="hello", voice="bob")
    message = caught.value.body["message"]
    assert caught.value.status_code == 400
    assert "Unknown voice 'bob'" in message and "(0, 1, 2)" in message and "alloy" in message


@pytest.fixture(scope="module")
def bark_and_speecht5(tmp_path_factory):
    root = tmp_path_factory.mktemp("voices")
    bark = build_bark(root / "bark")
    speecht5 = build_speecht5(root / "speecht5")
    build_hifigan(speecht5 / "vocoder")
    shipped = np.random.default_rng(3).standard_normal(16).astype(np.float32)
    (speecht5 / "speaker_embeddings").mkdir()
    np.save(speecht5 / "speaker_embeddings" / "narrator.npy", shipped)
    np.save(speecht5 / "speaker_embeddings" / "wrong_size.npy", np.zeros(7, np.float32))
    vocoder = [{"role": "vocoder", "repo_id": "t/hifigan", "revision": "0" * 40, "path": "vocoder"}]
    cpu = torch.device("cpu")

    def manifest(name: str, **extra) -> Manifest:
        return Manifest(
            name=name,
            source="huggingface",
            model_id=f"t/{name}",
            task="text-to-speech",
            extra=extra,
        )

    return (
        load(manifest("bark"), bark, cpu),
        load(manifest("speecht5", components=vocoder), speecht5, cpu),
        shipped,
    )


def test_bark_and_speecht5_voices(bark_and_speecht5):
    bark, speecht5, shipped = bark_and_speecht5
    from modelhost.audio.speech import model_voices

    assert model_voices(bark) == ["default", "en_speaker_0"]
    assert resolve_voice(bark, "ash").speaker == "en_speaker_0"
    assert resolve_voice(bark, "alloy").speaker is None
    assert model_voices(speecht5) == ["default", "narrator"]  # the 7-value file is skipped
    voice = resolve_voice(speecht5, "narrator")
    assert np.array_equal(voice.speaker, shipped)
    spoken = synthesize(speecht5, "hello", voice.speaker, seed=1).samples
    assert np.array_equal(spoken, synthesize(speecht5, "hello", list(shipped), seed=1).samples)
    default = synthesize(speecht5, "hello", resolve_voice(speecht5, None).speaker, seed=1)
    assert not np.array_equal(default.samples, spoken)


# --------------------------------------------------------------------------- streaming


class SentenceGate:
    """The test hook: counts sentences spoken by a model and holds the worker after sentence
    ``hold_after`` until ``release``, so what the client sees at that moment is certain."""

    def __init__(self, model: str, hold_after: int) -> None:
        self.model, self.hold_after = model, hold_after
        self.count = 0
        self.released = threading.Event()
        self.remove = add_sentence_listener(self._spoken)

    def _spoken(self, model: str, index: int) -> None:
        if model != self.model:
            return
        self.count += 1
        if index >= self.hold_after:
            self.released.wait(timeout=20)

    def close(self) -> None:
        self.released.set()
        self.remove()


def test_first_chunk_arrives_before_the_last_sentence(client):
    gate = SentenceGate("vits", hold_after=1)
    try:
        with client.audio.speech.with_streaming_response.create(
            model="vits", input=MANY, voice="alloy", response_format="pcm"
        ) as response:
            assert response.headers["x-modelhost-sentences"] == str(N_MANY)
            chunks = response.iter_bytes()
            first = next(chunks)
            seen_at_first = gate.count
            gate.released.set()
            rest = b"".join(chunks)
    finally:
        gate.close()
    assert len(first) > 0
    assert 1 <= seen_at_first <= 2 < N_MANY
    assert gate.count == N_MANY
    assert (len(first) + len(rest)) % 2 == 0 and len(rest) > len(first)


@pytest.mark.serial  # waits fixed times for the server to notice: run alone
def test_disconnect_stops_the_remaining_sentences(server):
    gate = SentenceGate("vits", hold_after=1)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
        body = json.dumps({"model": "vits", "input": MANY, "response_format": "pcm"})
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
        conn.request("POST", "/v1/audio/speech", body=body, headers=headers)
        response = conn.getresponse()
        assert response.status == 200
        assert len(response.read1(65536)) > 0  # sentence 0's audio
        conn.sock.shutdown(2)
        conn.close()
        time.sleep(0.5)  # the server notices while sentence 1 is held on the worker
        at_disconnect = gate.count
        gate.released.set()
        time.sleep(1.0)
        # Sentence 1 is held on the worker when the client leaves (or the server saw the
        # close before starting it): it ends, and none after it starts.
        assert at_disconnect in (1, 2)
        assert gate.count == at_disconnect, (at_disconnect, gate.count)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the hold on the model is released
            rows = server.client.get("/models/managed").json()["downloaded_models"]
            if next(r for r in rows if r["name"] == "vits")["inflight"] == 0:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the model stayed in use after the client left")
    finally:
        gate.close()


def test_concurrent_streams_never_mix(server):
    texts = [
        f"Stream {w} starts here. It has a middle, number {w}. And it ends now."
        for w in "one two three four five six seven eight".split()
    ]
    jobs = [(text, 100 + i) for i, text in enumerate(texts)]

    def fetch(job):
        text, seed = job
        body = {"model": "vits", "input": text, "response_format": "pcm", "seed": seed}
        response = server.client.post("/v1/audio/speech", json=body)
        assert response.status_code == 200, response.text
        return response.content

    sequential = [fetch(job) for job in jobs]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(fetch, jobs))
    assert len({len(b) for b in sequential}) > 1  # different texts: different audio
    # Concurrent sentences run as padded VITS batches (each item's noise from its own seed):
    # byte for byte what each stream gets alone.
    for alone, together in zip(sequential, concurrent, strict=True):
        assert together == alone


def test_sse_events_carry_the_same_audio(server):
    body = {"model": "vits", "input": TWO, "response_format": "pcm", "seed": 9}
    plain = server.client.post("/v1/audio/speech", json=body).content
    response = server.client.post("/v1/audio/speech", json={**body, "stream_format": "sse"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [block for block in response.text.split("\n\n") if block.strip()]
    parsed = []
    for block in events:
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"]
        parsed.append(data)
    assert [e["type"] for e in parsed[:-1]] == ["speech.audio.delta"] * (len(parsed) - 1)
    assert len(parsed) >= 3  # a delta per sentence at least
    audio = b"".join(base64.b64decode(e["audio"]) for e in parsed[:-1])
    assert audio == plain
    assert parsed[-1] == {
        "type": "speech.audio.done",
        "usage": {"input_tokens": len(TWO), "output_tokens": 0, "total_tokens": len(TWO)},
    }


def test_a_later_sentence_that_fails_leaves_the_body_incomplete(server):
    # "###" has no character the tiny VITS's tokenizer knows: sentence 1 fails after
    # sentence 0's audio went out with status 200.
    body = {"model": "vits", "input": "Hello there. ###", "response_format": "pcm"}
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        server.client.post("/v1/audio/speech", json=body)
    sse = server.client.post("/v1/audio/speech", json={**body, "stream_format": "sse"})
    assert sse.status_code == 200
    events = [json.loads(b.split("data: ", 1)[1]) for b in sse.text.split("\n\n") if b.strip()]
    assert [e["type"] for e in events] == ["speech.audio.delta", "error"]
    assert events[-1]["error"]["message"] == (
        "the text has no characters this model's tokenizer knows"
    )
    first_only = server.client.post("/v1/audio/speech", json={**body, "input": "###"})
    assert first_only.status_code == 400  # before the answer started: a plain 400
    assert "no characters" in first_only.json()["error"]["message"]


# --------------------------------------------------------------------------- errors


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        speak(client, model="no-such-model", input="hello")
    assert caught.value.body["message"] == (
        "The model 'no-such-model' does not exist: no installed model has that name "
        "(GET /v1/models lists them; POST /models/download installs one)"
    )
    assert (caught.value.body["code"], caught.value.body["param"]) == ("model_not_found", "model")


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"response_format": "ogg"}, "response_format: Input should be 'mp3', 'opus'"),
        ({"speed": 4.5}, "speed: Input should be less than or equal to 4"),
        ({"speed": 0.1}, "speed: Input should be greater than or equal to 0.25"),
        ({"speed": "fast"}, "speed: Input should be a valid number"),
        ({"stream_format": "chunks"}, "stream_format: Input should be 'audio' or 'sse'"),
        ({"language": "en"}, "language: Extra inputs are not permitted"),
        ({"input": ""}, "input: String should have at least 1 character"),
        ({"input": " \n "}, "input has no text to speak"),
        ({"input": "x" * 4097}, "POST /v1/audio/speech/jobs"),
    ],
)
def test_bad_requests_are_400_with_a_message(server, extra, needle):
    body = {"model": "vits", "input": "hello", **extra}
    response = server.client.post("/v1/audio/speech", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert needle in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_instructions_accepted_and_reported_ignored(server):
    body = {"model": "vits", "input": "hello.", "instructions": "whisper it", "seed": 1}
    response = server.client.post("/v1/audio/speech", json={**body, "response_format": "wav"})
    assert response.status_code == 200
    assert response.headers["x-modelhost-ignored"] == "instructions"
    without = {k: v for k, v in body.items() if k != "instructions"}
    plain = server.client.post("/v1/audio/speech", json={**without, "response_format": "wav"})
    assert "x-modelhost-ignored" not in plain.headers
    assert plain.content == response.content


def test_api_key_required(server):
    anonymous = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        speak(anonymous, input="hello")


def test_not_loaded_model_says_how_to_load(server, client, monkeypatch):
    # With on-demand loading off (on, the request loads the model).
    settings = server.server.config.app.state.services.settings
    monkeypatch.setattr(settings, "load_on_demand", False)
    assert server.client.post("/models/vits3/unload").status_code == 200
    try:
        with pytest.raises(openai.ConflictError) as caught:
            speak(client, model="vits3", input="hello")
        assert "POST /models/vits3/load" in caught.value.body["message"]
        assert "modelhost load vits3" in caught.value.body["message"]
        assert "MODELHOST_LOAD_ON_DEMAND" in caught.value.body["message"]
    finally:
        assert server.client.post("/models/vits3/load").status_code == 200


# --------------------------------------------------------------------------- units


def test_sentence_seeds():
    assert [sentence_seed(7, i) for i in range(3)] == [7, 8, 9]
    assert sentence_seed(None, 4) is None
    assert sentence_seed(2**64 - 1, 1) == 0 and sentence_seed(2**64 - 2, 3) == 1
    assert sentence_seed(-(2**63), 2) == -(2**63) + 2


def test_stream_encoder_chunks_join_into_the_whole_file():
    rng = np.random.default_rng(0)
    samples = (0.3 * rng.standard_normal(RATE)).astype(np.float32)
    parts = np.split(samples, [3000, 9001])
    for fmt in ("pcm", "aac"):  # raw frames; ADTS frames are self-contained
        encoder = StreamEncoder(fmt, RATE)
        chunks = [encoder.feed(p) for p in parts] + [encoder.close()]
        assert all(chunks[:3]), fmt  # bytes after every chunk: it streams
        assert b"".join(chunks) == encode_audio(samples, RATE, fmt), fmt
    encoder = StreamEncoder("flac", RATE)  # written whole at the end
    assert [encoder.feed(p) for p in parts] == [b"", b"", b""]
    assert encoder.close() == encode_audio(samples, RATE, "flac")
    wav = StreamEncoder("wav", RATE)
    data = b"".join([wav.feed(p) for p in parts] + [wav.close()])
    assert sf.read(io.BytesIO(data), dtype="int16")[0].shape == (RATE,)
