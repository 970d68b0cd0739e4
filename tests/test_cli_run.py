"""``modelhost run``, catalog names in ``pull``, and ``say``'s default model: the real
``modelhost`` executable against a real server (not loading on demand, so ``run`` must load
by itself) and the loopback Hub, where the tiny models stand in for the catalog's repos."""

from __future__ import annotations

import json
import subprocess
import wave
from pathlib import Path

import pytest
from conftest import RunningServer, make_settings
from hubserver import HubServer
from test_cli import MODELHOST, cli_env
from tiny_models import publish_all

TTS_REPO = "facebook/mms-tts-eng"  # the tiny VITS on the test Hub; also the catalog's mms_tts_eng


def run_cli(url: str, *args: str, cwd: Path | None = None, stdin: str | None = None, **env: str):
    """``modelhost --url URL ARGS...`` in ``cwd``, with ``stdin`` piped (else /dev/null)."""
    return subprocess.run(
        [str(MODELHOST), "--url", url, *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        env=cli_env(**env),
    )


@pytest.fixture(scope="module")
def hub(tiny_models):
    with HubServer() as server:
        publish_all(server, tiny_models)
        yield server


@pytest.fixture(scope="module")
def server(hub, tmp_path_factory):
    home = tmp_path_factory.mktemp("cli-run-home")
    settings = make_settings(
        home,
        [hub.host_port],
        hf_endpoint=hub.base_url,
        hf_hub_cache=home / "no-hf-cache",
        device="cpu",
        load_on_demand=False,
    )
    running = RunningServer(settings).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def cli(server):
    def invoke(*args: str, **kwargs):
        return run_cli(server.base_url, *args, **kwargs)

    return invoke


def installed(server: RunningServer, name: str) -> bool:
    return server.client.get(f"/models/download/{name}/info").status_code == 200


def loaded_names(server: RunningServer) -> set[str]:
    rows = server.client.get("/models/managed").json()["downloaded_models"]
    return {row["name"] for row in rows}


@pytest.fixture(scope="module")
def spoken(cli, server, tmp_path_factory):
    """``modelhost run facebook/mms-tts-eng Hello`` from nothing, in an empty directory."""
    assert not installed(server, "mms-tts-eng")
    workdir = tmp_path_factory.mktemp("run-tts")
    result = cli("run", TTS_REPO, "Hello", "there", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, workdir


@pytest.fixture(scope="module")
def embedded(cli, server):
    """``modelhost run all_minilm_l6_v2 hello --json`` from nothing (a catalog name)."""
    assert not installed(server, "all_minilm_l6_v2")
    result = cli("run", "all_minilm_l6_v2", "hello", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def catalog_pulled(cli, server):
    """``modelhost pull mms_tts_eng``: the catalog's entry, installed and loaded."""
    assert not installed(server, "mms_tts_eng")
    result = cli("pull", "mms_tts_eng")
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_run_speaks_from_nothing_into_name_wav(spoken, server, tiny_models):
    result, workdir = spoken
    path = workdir / "mms-tts-eng.wav"
    assert sorted(p.name for p in workdir.iterdir()) == ["mms-tts-eng.wav"]
    with open(path, "rb") as handle:
        head = handle.read(12)
    assert head[:4] == b"RIFF" and head[8:12] == b"WAVE"
    with wave.open(str(path)) as reader:
        rate, frames = reader.getframerate(), reader.getnframes()
    assert frames > 0 and reader.getnchannels() == 1
    config = json.loads((tiny_models["vits"] / "config.json").read_text())
    assert rate == config["sampling_rate"]
    # The pull's phases and bars, then the file: path and duration.
    assert "Started downloading model 'mms-tts-eng'" in result.stdout
    assert "completed" in result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert last == (
        f"wrote mms-tts-eng.wav ({frames / rate:.2f} s at {rate} Hz, "
        f"{path.stat().st_size} bytes) with mms-tts-eng"
    )
    assert "mms-tts-eng" in loaded_names(server)


def test_run_embeds_from_nothing_as_the_api_does(embedded, cli, server, tiny_models):
    answer = json.loads(embedded.stdout)  # --json: stdout is the server's JSON alone
    hidden = json.loads((tiny_models["minilm"] / "config.json").read_text())["hidden_size"]
    (vector,) = answer["embeddings"]
    assert answer["dimension"] == len(vector) == hidden
    direct = server.client.post("/models/all_minilm_l6_v2/predict", json={"inputs": "hello"})
    assert direct.status_code == 200, direct.text
    same = zip(vector, direct.json()["embeddings"][0], strict=True)
    assert max(abs(a - b) for a, b in same) < 1e-5
    jobs = server.client.get("/models/downloads").json()["downloads"]
    job = next(j for j in jobs if j["model_name"] == "all_minilm_l6_v2")
    assert job["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    # Installed and loaded now: the second run pulls nothing and prints the head.
    again = cli("run", "all_minilm_l6_v2", "hello")
    assert again.returncode == 0, again.stderr
    head = ", ".join(f"{v:.4f}" for v in vector[:8])
    assert again.stdout == f"dimension {hidden}: [{head}, ...]\n"


def test_pull_installs_a_catalog_name(catalog_pulled, server):
    catalog = server.client.get("/models/available").json()["available_models"]
    entry = catalog["mms_tts_eng"]["download_request"]
    jobs = server.client.get("/models/downloads").json()["downloads"]
    job = next(j for j in jobs if j["model_name"] == "mms_tts_eng")
    assert (job["source"], job["model_id"], job["status"]) == (
        entry["source"],
        entry["model_id"],
        "completed",
    )
    assert entry["model_id"] == TTS_REPO
    info = server.client.get("/models/download/mms_tts_eng/info").json()
    assert info["task"] == entry["task"] == "text-to-speech"
    assert "Started downloading model 'mms_tts_eng'" in catalog_pulled.stdout


def test_a_source_typo_and_an_unknown_name_suggest(cli, server):
    result = cli("pull", "hugingface:org/x")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("unknown source 'hugingface': did you mean 'huggingface'?")
    api = server.client.post(
        "/models/download", json={"source": "hugingface", "model_id": "org/x", "name": "x"}
    )
    assert api.status_code == 400 and result.stderr.strip() == api.json()["message"]

    result = cli("pull", "mms-tts-en")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "'mms-tts-en' is not a catalog name, SOURCE:MODEL_ID or a Hub id ORG/NAME; did you "
        "mean mms_tts_eng? (`modelhost catalog` lists the catalog)"
    )
    result = cli("run", "mms_tts_en", "hi")
    assert result.returncode == 1
    assert result.stderr.startswith("'mms_tts_en' is not an installed model, a catalog name")
    assert "did you mean mms_tts_eng" in result.stderr


def test_say_picks_its_model(spoken, catalog_pulled, cli, server, tmp_path):
    both = ("mms-tts-eng", "mms_tts_eng")
    for name in both:
        server.client.post(f"/models/{name}/unload")
    out = str(tmp_path / "said.wav")
    result = cli("say", "hi", "-o", out)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "several text-to-speech models: pass one with -m NAME or set MODELHOST_DEFAULT_TTS; "
        "installed: mms-tts-eng, mms_tts_eng"
    )

    result = cli("say", "hi", "-o", out, MODELHOST_DEFAULT_TTS="mms_tts_eng")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("with mms_tts_eng")
    assert loaded_names(server) & set(both) == {"mms_tts_eng"}  # say loaded it

    # One TTS model loaded: that one, even over the default.
    server.client.post("/models/mms_tts_eng/unload")
    server.client.post("/models/mms-tts-eng/load")
    result = cli("say", "hi", "-o", out, MODELHOST_DEFAULT_TTS="mms_tts_eng")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("with mms-tts-eng")

    # Both loaded: the listing marks them.
    server.client.post("/models/mms_tts_eng/load")
    result = cli("say", "hi", "-o", out)
    assert result.returncode == 1
    assert "installed: mms-tts-eng (loaded), mms_tts_eng (loaded)" in result.stderr


def test_speaking_with_a_text_model_lists_the_tts_models(
    spoken, embedded, catalog_pulled, cli, server, tmp_path
):
    expected = (
        "Model 'all_minilm_l6_v2' is not a text-to-speech model (task: feature-extraction); "
        "installed TTS models: mms-tts-eng, mms_tts_eng"
    )
    result = cli("say", "hi", "-m", "all_minilm_l6_v2", "-o", str(tmp_path / "x.wav"))
    assert result.returncode == 1
    assert result.stderr.startswith(expected)
    direct = server.client.post(
        "/synthesize", json={"model_name": "all_minilm_l6_v2", "text": "hi"}
    )
    assert direct.status_code == 400 and direct.json()["message"] == result.stderr.strip()
    openai = server.client.post(
        "/v1/audio/speech", json={"model": "all_minilm_l6_v2", "input": "hi", "voice": "alloy"}
    )
    assert openai.status_code == 400, openai.text
    assert openai.json()["error"]["message"] == expected
    assert openai.json()["error"]["param"] == "model"


def test_run_reads_the_text_to_speak_from_a_pipe(spoken, cli, tmp_path):
    result = cli("run", "mms-tts-eng", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        "nothing to run on: pass the text to speak as TEXT, or pipe it on stdin\n"
    )
    out = tmp_path / "piped.wav"
    result = cli("run", "mms-tts-eng", "-o", str(out), "--json", stdin="Hello from a pipe\n")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    with wave.open(str(out)) as reader:
        assert facts["frames"] == reader.getnframes() > 0
        assert facts["sample_rate"] == reader.getframerate()
    assert facts["output"] == str(out) and facts["model_name"] == "mms-tts-eng"


def test_run_classifies_and_transcribes(spoken, cli, server):
    result = cli("run", "test-org/tiny-bert", "hello", "world")
    assert result.returncode == 0, result.stderr
    direct = server.client.post("/models/tiny-bert/predict", json={"inputs": "hello world"})
    rows = direct.json()["predictions"]
    expected = [f"{row['score']:.4f}  {row['label']}" for row in rows]
    assert result.stdout.strip().splitlines()[-len(rows) :] == expected

    audio = spoken[1] / "mms-tts-eng.wav"
    result = cli("run", "test-org/tiny-whisper", str(audio), "--json")
    assert result.returncode == 0, result.stderr
    direct = server.client.post(
        "/v1/audio/transcriptions",
        data={"model": "tiny-whisper"},
        files={"file": (audio.name, audio.read_bytes())},
    )
    assert direct.status_code == 200, direct.text
    assert json.loads(result.stdout) == direct.json()
    missing = cli("run", "tiny-whisper", "no-such.wav")
    assert missing.returncode == 1
    assert missing.stderr == "pass the audio file to read as TEXT (no-such.wav is not a file)\n"
