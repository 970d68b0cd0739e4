"""The dashboard's panels, one test each, in Debian's headless Chromium against a real
modelhost with tiny real models: pull, load-failure reasons, download history, speak with a
voice and a format, embeddings, classification, transcription, and a screenshot that is not
blank. Every value the page shows is compared with what the API answers directly.

Each test leaves screenshots in its ``tmp_path``. ``MODELHOST_SCREENSHOT=1`` also refreshes
the README's picture (``docs/dashboard.png``) from the screenshot test.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import wave
from pathlib import Path

import pytest
from conftest import RunningServer, make_settings
from hubserver import HubServer
from test_dashboard import ARGS, CHROMIUM, Page, installed_row, sync_api
from tiny_models import build_vits, minilm_dir, publish_all

MB = 1_000_000
BIG = {"weights.bin": os.urandom(12 * MB)}
DOCS_PICTURE = Path(__file__).parent.parent / "docs" / "dashboard.png"
HEADINGS = (
    "Pull a model",
    "Downloads",
    "Installed models",
    "Speak",
    "Embeddings",
    "Classification",
    "Transcription",
    "Loaded models",
    "Cache",
    "Catalog",
)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def broken_bert(tiny_models, tmp_path_factory) -> Path:
    """The tiny BERT with a config its weights cannot be built from (32 hidden, 5 heads)."""
    directory = tmp_path_factory.mktemp("broken-bert")
    for item in tiny_models["bert"].iterdir():
        shutil.copy(item, directory / item.name)
    config = json.loads((directory / "config.json").read_text())
    config["num_attention_heads"] = 5
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory) -> Path:
    """A tiny VITS with three speakers: voices "0", "1" and "2"."""
    return build_vits(tmp_path_factory.mktemp("vits3") / "vits3", num_speakers=3,
                      speaker_embedding_size=8)  # fmt: skip


@pytest.fixture(scope="module")
def hub(tiny_models, broken_bert):
    # 2 MB/s: the 12 MB download runs long enough to be cancelled from the page.
    with HubServer(rate_bytes_per_s=2 * MB) as server:
        publish_all(server, tiny_models)
        server.add_repo("test-org/broken-bert", broken_bert)
        server.add_repo("test-org/big", BIG, lfs_threshold=1000)
        yield server


@pytest.fixture
def modelhost(make_server, hub, tmp_path):
    def start(**overrides):
        values = {"hf_endpoint": hub.base_url, "hf_hub_cache": tmp_path / "none", "device": "cpu"}
        values.update(overrides)
        return make_server([], **values)

    return start


def install_local(server: RunningServer, path: Path, name: str, task: str) -> None:
    body = {"source": "local", "model_id": str(path), "name": name, "task": task}
    answer = server.client.post("/models/download", json=body)
    assert answer.status_code == 202, answer.text
    status = server.wait_for(answer.json()["download_id"], timeout=180)
    assert status["status"] == "completed" and "loaded on cpu" in status["message"], status


@pytest.fixture(scope="module")
def stocked(tiny_models, voices_dir, tmp_path_factory):
    """One server for the try-it panels: MiniLM, the tiny BERT classifier, the tiny Whisper
    and the three-voice VITS, installed from local directories and loaded."""
    roots = (minilm_dir().parent, tiny_models["bert"].parent, voices_dir.parent)
    settings = make_settings(tmp_path_factory.mktemp("home"), [], import_roots=roots, device="cpu")
    server = RunningServer(settings).start()
    install_local(server, minilm_dir(), "minilm", "feature-extraction")
    install_local(server, tiny_models["bert"], "bert", "text-classification")
    install_local(server, tiny_models["whisper"], "whisper", "automatic-speech-recognition")
    install_local(server, voices_dir, "voices", "text-to-speech")
    yield server
    server.stop()


class Watched(Page):
    """A page that also records console errors, uncaught exceptions and error answers."""

    def __init__(self, browser, server) -> None:
        super().__init__(browser, server)
        self.errors: list[str] = []
        self.refused: list[str] = []  # "<status> <url>" of every answer >= 400
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on(
            "response", lambda r: r.status >= 400 and self.refused.append(f"{r.status} {r.url}")
        )

    def _console(self, message) -> None:
        # The browser logs each error answer; those are checked in `refused`.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def open(self, path: str = "/"):
        self.page.goto(self.server.base_url + path)
        self.page.locator("body[data-ready]").wait_for(state="attached", timeout=30_000)
        return self.page

    def done(self, refused: tuple[str, ...] = ()) -> None:
        """Close, asserting no outside request, no script error, and no error answer but
        those expected (``refused``: "<status> <path>")."""
        assert self.foreign() == []
        assert self.errors == []
        own = self.server.base_url
        assert sorted(r.replace(own, "") for r in self.refused) == sorted(refused)
        self.page.close()


def jobs_by_id(server) -> dict[str, dict]:
    listed = server.client.get("/models/downloads").json()["downloads"]
    return {job["download_id"]: job for job in listed}


def load_failure(message: str) -> str | None:
    """The reason a job's message gives for its failed load (both wordings the server has
    used: ``loading failed: <reason>`` and ``could not be loaded: <reason>``)."""
    match = re.search(r"(?:loading failed|could not be loaded):\s*(.+)$", message, re.S)
    return re.sub(r";\s*retry with:.*$", "", match.group(1), flags=re.S).strip() if match else None


# --------------------------------------------------------------------------- pull


def test_pull_box_installs_a_hub_id(browser, modelhost, tmp_path):
    server = modelhost()
    view = Watched(browser, server)
    page = view.open()
    # A refusal comes back with the server's own message, shown under the form.
    page.fill("#pull-id", "test-org/tiny-bert")
    page.fill("#pull-name", "no spaces allowed")
    page.click("#pull-submit")
    page.locator("#pull-error").wait_for()
    body = {"source": "huggingface", "model_id": "test-org/tiny-bert", "name": "no spaces allowed"}
    refusal = server.client.post("/models/download", json={**body, "load": True})
    assert refusal.status_code == 400
    assert refusal.json()["message"] in page.inner_text("#pull-error")
    page.screenshot(path=tmp_path / "pull-refused.png")

    # A bare Hub id: huggingface, named after the repository, loaded after install.
    page.fill("#pull-name", "")
    with page.expect_response(lambda r: r.url.endswith("/models/download")) as answered:
        page.click("#pull-submit")
    assert answered.value.status == 202
    assert answered.value.request.post_data_json == {
        "source": "huggingface",
        "model_id": "test-org/tiny-bert",
        "name": "tiny-bert",
        "load": True,
    }
    job_id = answered.value.json()["download_id"]
    page.locator("#pull-result").filter(has_text=answered.value.json()["message"]).wait_for()
    card = page.locator(f'.job[data-id="{job_id}"]')
    card.wait_for()
    page.locator(f'.job[data-id="{job_id}"][data-status="completed"]').wait_for(timeout=60_000)
    assert card.locator(".message").inner_text() == jobs_by_id(server)[job_id]["message"]
    row = installed_row(page, "tiny-bert")
    row.locator(".state").filter(has_text="loaded on cpu").wait_for(timeout=30_000)
    (model,) = server.client.get("/models/cache/info").json()["installed_models"]
    assert (model["name"], model["source"], model["model_id"]) == (
        "tiny-bert",
        "huggingface",
        "test-org/tiny-bert",
    )
    assert row.locator(".source").inner_text() == "huggingface:test-org/tiny-bert"
    assert row.locator(".size").inner_text() == f"{model['size_bytes'] / 1e6:.1f} MB"
    assert row.locator(".revision").inner_text() == model["revision"][:12]
    managed = server.client.get("/models/managed").json()["downloaded_models"]
    assert [(m["name"], m["device"]) for m in managed] == [("tiny-bert", "cpu")]
    page.screenshot(path=tmp_path / "pulled.png", full_page=True)

    # A catalog name: the body is the entry's download_request, with the options set here.
    entry = server.client.get("/models/available").json()["available_models"]["mms_tts_eng"]
    page.fill("#pull-id", "mms_tts_eng")
    page.fill("#pull-name", "speaker")
    page.uncheck("#pull-load")
    page.check("#pull-pin")
    with page.expect_response(lambda r: r.url.endswith("/models/download")) as answered:
        page.click("#pull-submit")
    assert answered.value.status == 202
    assert answered.value.request.post_data_json == {
        **entry["download_request"],
        "name": "speaker",
        "load": False,
        "pin": True,
    }
    installed_row(page, "speaker").locator(".state").filter(has_text="not loaded").wait_for(
        timeout=60_000
    )
    info = server.client.get("/models/download/speaker/info").json()
    assert (info["source"], info["model_id"]) == (entry["source"], entry["model_id"])
    # The Speak panel lists it with its voices, or the server's reason why it has none yet
    # (they need the model loaded; a server with MODELHOST_LOAD_ON_DEMAND loads it).
    voices = server.client.get("/v1/audio/voices", params={"model": "speaker"})
    refused = ["400 /models/download"]
    if voices.status_code == 200:
        page.wait_for_function(
            "n => document.querySelectorAll('#speak-voice option').length === n",
            arg=len(voices.json()["voices"]),
        )
        shown = page.eval_on_selector_all("#speak-voice option", "os => os.map(o => o.value)")
        assert shown == voices.json()["voices"]
    else:
        assert voices.status_code == 409, voices.text
        page.locator("#speak-error").filter(has_text=voices.json()["error"]["message"]).wait_for()
        refused.append("409 /v1/audio/voices?model=speaker")
    view.done(refused=tuple(refused))


# --------------------------------------------------------------------------- load failure


def test_a_failed_load_shows_the_servers_reason(browser, modelhost, tmp_path):
    server = modelhost()
    answer = server.client.post(
        "/models/download",
        json={"source": "huggingface", "model_id": "test-org/broken-bert", "name": "broken"},
    )
    assert answer.status_code == 202, answer.text
    ended = server.wait_for(answer.json()["download_id"], timeout=60)
    reason = load_failure(ended["message"])
    assert reason and "attention heads" in reason, ended
    installed = [
        m["name"] for m in server.client.get("/models/cache/info").json()["installed_models"]
    ]

    view = Watched(browser, server)
    page = view.open()
    card = page.locator(f'.job[data-id="{ended["download_id"]}"]')
    assert card.locator(".message").inner_text() == ended["message"]
    if "broken" not in installed:  # a failed load that also uninstalls: the history says why
        view.done()
        return
    row = installed_row(page, "broken")
    assert row.locator(".state .badge").inner_text() == "failed to load"
    assert row.locator(".reason").inner_text() == reason  # from the job's message
    page.screenshot(path=tmp_path / "failed-from-job.png", full_page=True)

    # A Load click: the reason is the error answer's message.
    direct = server.client.post("/models/broken/load", json={})
    assert direct.status_code in (400, 422), direct.text  # a bad config; 422: Load failed
    with page.expect_response(lambda r: r.url.endswith("/models/broken/load")) as answered:
        row.locator("button", has_text="Load").click()
    assert answered.value.status == direct.status_code
    message = answered.value.json()["message"]
    assert message == direct.json()["message"]
    row = installed_row(page, "broken")
    page.locator(".toast").filter(has_text=message).wait_for()
    row.locator(".reason").filter(has_text=message).wait_for()
    assert row.locator(".reason").inner_text() == message
    page.screenshot(path=tmp_path / "failed-on-click.png", full_page=True)
    view.done(refused=(f"{direct.status_code} /models/broken/load",))


# --------------------------------------------------------------------------- history


def test_history_lists_failed_and_cancelled_jobs_with_their_messages(browser, modelhost, tmp_path):
    server = modelhost()
    view = Watched(browser, server)
    page = view.open()
    # Failed: the Hub has no such repository (recorded as a failed job).
    page.fill("#pull-id", "test-org/no-such-model")
    page.click("#pull-submit")
    page.locator("#pull-error").wait_for()
    (failed,) = [j for j in jobs_by_id(server).values() if j["status"] == "failed"]
    said = page.inner_text("#pull-error").split(": ", 1)[1]  # after the error's title
    assert said and said in failed["message"]
    page.locator(f'.job[data-id="{failed["download_id"]}"]').wait_for()

    # Cancelled: a slow download, cancelled with its card's button while it runs.
    page.fill("#pull-id", "test-org/big")
    page.uncheck("#pull-load")
    page.click("#pull-submit")
    live = page.locator('.job.live[data-status="downloading"]')
    live.wait_for(timeout=30_000)
    cancelled_id = live.get_attribute("data-id")
    live.locator("button", has_text="Cancel").click()
    page.locator(f'.job[data-id="{cancelled_id}"][data-status="cancelled"]').wait_for(
        timeout=30_000
    )
    page.screenshot(path=tmp_path / "history-live.png", full_page=True)

    # A fresh page lists both from GET /models/downloads, with the server's messages.
    page.reload()
    page.locator("body[data-ready]").wait_for(state="attached")
    jobs = jobs_by_id(server)
    assert jobs[cancelled_id]["status"] == "cancelled"
    for job_id in (failed["download_id"], cancelled_id):
        card = page.locator(f'.job[data-id="{job_id}"]')
        assert card.get_attribute("data-status") == jobs[job_id]["status"]
        assert card.locator(".message").inner_text() == jobs[job_id]["message"]
        assert card.locator(".badge").first.inner_text() == jobs[job_id]["status"]
        assert card.locator("button", has_text="Retry").count() == 1  # neither is installed
    assert "cancelled" in jobs[cancelled_id]["message"].lower()
    assert "no-such-model" in jobs[failed["download_id"]]["message"]
    assert page.locator(".job").count() == len(jobs) == 2
    page.screenshot(path=tmp_path / "history.png", full_page=True)
    view.done(refused=("404 /models/download",))


# --------------------------------------------------------------------------- speak


def _magic_ok(fmt: str, data: bytes) -> bool:
    if fmt == "wav":
        return data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    if fmt == "mp3":
        return data[:3] == b"ID3" or (data[0] == 0xFF and data[1] & 0xE0 == 0xE0)
    raise AssertionError(fmt)


BLOB_HEAD = """async () => {
  const a = document.getElementById('speak-audio');
  const bytes = new Uint8Array(await (await fetch(a.src)).arrayBuffer());
  return { head: Array.from(bytes.slice(0, 16)), size: bytes.length };
}"""


def test_speak_with_a_voice_and_a_format(browser, stocked, tmp_path):
    view = Watched(browser, stocked)
    page = view.open()
    page.select_option("#speak-model", "voices")
    voices = stocked.client.get("/v1/audio/voices", params={"model": "voices"}).json()
    assert voices["voices"] == ["0", "1", "2"]
    page.wait_for_function("() => document.querySelectorAll('#speak-voice option').length === 3")
    shown = page.eval_on_selector_all("#speak-voice option", "os => os.map(o => o.value)")
    assert shown == voices["voices"]
    page.fill("#speak-text", "hello there.")
    page.select_option("#speak-voice", "2")
    page.fill("#speak-speed", "1.25")
    for fmt in ("mp3", "wav"):
        page.select_option("#speak-format", fmt)
        with page.expect_response(lambda r: r.url.endswith("/v1/audio/speech")) as answered:
            page.click("#speak-submit")
        response = answered.value
        assert response.status == 200
        assert response.request.post_data_json == {
            "model": "voices",
            "input": "hello there.",
            "voice": "2",
            "response_format": fmt,
            "speed": 1.25,
        }
        page.wait_for_function(
            "fmt => { const a = document.getElementById('speak-download');"
            " return a.download === 'speech.' + fmt && a.href.startsWith('blob:'); }",
            arg=fmt,
        )
        blob = page.evaluate(BLOB_HEAD)
        head = bytes(blob["head"])
        assert _magic_ok(fmt, head), head
        assert page.get_attribute("#speak-audio", "src") == page.get_attribute(
            "#speak-download", "href"
        )
        assert f"({blob['size']:,} bytes)" in page.inner_text("#speak-info")
        page.wait_for_function(
            "() => { const a = document.getElementById('speak-audio');"
            " return a.readyState >= 1 && a.duration > 0; }",
            timeout=30_000,
        )
        page.screenshot(path=tmp_path / f"speak-{fmt}.png")
    view.done()


# --------------------------------------------------------------------------- try-it panels


def test_embeddings_show_dimension_values_and_cosine(browser, stocked, tmp_path):
    hidden = json.loads((minilm_dir() / "config.json").read_text())["hidden_size"]
    view = Watched(browser, stocked)
    page = view.open()
    page.select_option("#embed-model", "minilm")
    page.fill("#embed-a", "the same words")
    page.fill("#embed-b", "the same words")
    page.click("#embed-submit")
    page.locator("#embed-result").wait_for()
    assert page.inner_text("#embed-dim") == str(hidden) == "384"
    assert page.inner_text("#embed-cosine") == "1.000"
    direct = stocked.client.post(
        "/v1/embeddings", json={"model": "minilm", "input": ["the same words"]}
    ).json()
    vector = direct["data"][0]["embedding"]
    first = ", ".join(f"{x:.4f}" for x in vector[:8]) + ", …"
    assert page.inner_text("#embed-first") == first
    assert page.inner_text("#embed-norm") == f"{math.sqrt(sum(x * x for x in vector)):.4f}"
    assert page.inner_text("#embed-tokens") == str(2 * direct["usage"]["prompt_tokens"])
    page.screenshot(path=tmp_path / "embed-same.png")

    # Two different texts: the cosine of the server's two vectors.
    texts = ["A cat sits on the mat.", "Stock markets fell sharply today."]
    page.fill("#embed-a", texts[0])
    page.fill("#embed-b", texts[1])
    page.click("#embed-submit")
    pair = stocked.client.post("/v1/embeddings", json={"model": "minilm", "input": texts}).json()
    a, b = (d["embedding"] for d in pair["data"])
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    cosine = dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    assert cosine < 0.9
    page.locator("#embed-cosine").filter(has_text=f"{cosine:.3f}").wait_for()
    page.screenshot(path=tmp_path / "embed-pair.png")
    view.done()


def test_classification_shows_the_models_labels_with_scores(
    browser, stocked, tiny_models, tmp_path
):
    id2label = json.loads((tiny_models["bert"] / "config.json").read_text())["id2label"]
    view = Watched(browser, stocked)
    page = view.open()
    page.select_option("#classify-model", "bert")
    page.fill("#classify-text", "what a wonderful day")
    page.click("#classify-submit")
    page.wait_for_function(
        f"() => document.querySelectorAll('.score-row').length === {len(id2label)}"
    )
    labels = page.eval_on_selector_all(".score-row .label", "ls => ls.map(l => l.textContent)")
    assert sorted(labels) == sorted(id2label.values()) == ["NEGATIVE", "POSITIVE"]
    direct = stocked.client.post("/models/bert/predict", json={"inputs": "what a wonderful day"})
    predictions = direct.json()["predictions"]
    assert labels == [p["label"] for p in predictions]
    scores = page.eval_on_selector_all(".score-row .score", "ss => ss.map(s => s.textContent)")
    assert scores == [f"{p['score']:.3f}" for p in predictions]
    bars = page.eval_on_selector_all(".score-row progress", "bs => bs.map(b => b.value)")
    assert bars == pytest.approx([100 * p["score"] for p in predictions], abs=1e-6)
    page.screenshot(path=tmp_path / "classify.png")
    view.done()


def _tone(path: Path, seconds: float = 1.0, rate: int = 16_000) -> bytes:
    frames = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate)))
        for i in range(int(seconds * rate))
    )
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(frames)
    return path.read_bytes()


def test_transcription_upload_shows_the_servers_text(browser, stocked, tmp_path):
    clip = tmp_path / "tone.wav"
    data = _tone(clip)
    direct = stocked.client.post(
        "/v1/audio/transcriptions",
        files={"file": ("tone.wav", data, "audio/wav")},
        data={"model": "whisper", "response_format": "json"},
    )
    assert direct.status_code == 200, direct.text
    expected = direct.json()
    assert expected["text"].strip(), expected  # random weights, but words all the same
    view = Watched(browser, stocked)
    page = view.open()
    page.select_option("#transcribe-model", "whisper")
    page.set_input_files("#transcribe-file", str(clip))
    with page.expect_request(lambda r: r.url.endswith("/v1/audio/transcriptions")) as sent:
        page.click("#transcribe-submit")
    assert sent.value.headers["content-type"].startswith("multipart/form-data; boundary=")
    page.locator("#transcribe-info").filter(has_text="s of audio").wait_for(timeout=60_000)
    assert page.input_value("#transcribe-text") == expected["text"]
    assert page.inner_text("#transcribe-info") == f"{expected['usage']['seconds']:.2f} s of audio"
    page.screenshot(path=tmp_path / "transcribe.png")
    view.done()


# --------------------------------------------------------------------------- the whole page


def _looks_blank(path: Path) -> tuple[bool, int, float]:
    """(blank?, distinct colours, share of pixels not of the most common colour)."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 24)
    assert colours is not None
    background = max(colours)[0]
    total = image.width * image.height
    ink = 1 - background / total
    return len(colours) < 64 or ink < 0.10, len(colours), ink


def test_page_is_styled_not_blank_and_serves_its_modules_safely(browser, stocked, tmp_path):
    # The detector itself: an empty page is blank.
    empty = browser.new_page()
    empty.set_content("<html><body></body></html>")
    empty.screenshot(path=tmp_path / "empty.png", full_page=True)
    empty.close()
    assert _looks_blank(tmp_path / "empty.png")[0]

    view = Watched(browser, stocked)
    page = view.page
    page.set_viewport_size({"width": 1440, "height": 900})
    view.open()
    for name in ("minilm", "bert", "whisper", "voices"):
        installed_row(page, name).locator(".state").filter(has_text="loaded on cpu").wait_for()
    page.select_option("#classify-model", "bert")
    page.click("#classify-submit")
    page.locator(".score-row").first.wait_for()
    page.select_option("#embed-model", "minilm")
    page.click("#embed-submit")
    page.locator("#embed-result").wait_for()
    for heading in HEADINGS:
        assert page.get_by_role("heading", name=heading).is_visible(), heading
    assert re.fullmatch(r"v\S+", page.inner_text("#version"))
    assert "healthy" in page.inner_text("#health")
    # Styled: cards on a tinted background, a real font stack, badges in colour.
    style = page.evaluate(
        "() => { const c = getComputedStyle(document.querySelector('.card'));"
        " const b = getComputedStyle(document.body);"
        " return [c.borderRadius, c.backgroundColor, b.backgroundColor, b.fontFamily]; }"
    )
    assert style[0] != "0px" and style[1] != style[2] and "system-ui" in style[3]
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=shot, full_page=True)
    blank, colours, ink = _looks_blank(shot)
    assert not blank, (colours, ink)
    if os.environ.get("MODELHOST_SCREENSHOT"):  # the README's picture, refreshed by hand
        page.set_viewport_size({"width": 1440, "height": 1180})
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=DOCS_PICTURE)
    # Dark when the system is: another background, still a page.
    light = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.emulate_media(color_scheme="dark")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") != light
    page.screenshot(path=tmp_path / "dashboard-dark.png", full_page=True)
    assert not _looks_blank(tmp_path / "dashboard-dark.png")[0]

    # The modules: served as JavaScript, under a policy that runs only the server's files.
    page_answer = stocked.client.get("/")
    csp = page_answer.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'self'" in csp
    assert page_answer.headers["x-content-type-options"] == "nosniff"
    modules = [u for u in view.requests if u.endswith(".js")]
    assert {u.rsplit("/ui/", 1)[1] for u in modules} >= {"app.js", "api.js", "panels/pull.js"}
    for url in modules:
        answer = stocked.client.get(url)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(
            "text/javascript"
        ), url
    assert stocked.client.get("/ui/panels/../../api/ui.py").status_code == 404
    assert stocked.client.get("/ui/panels/nope.js").status_code == 404
    view.done()


def test_every_dashboard_file_is_served_and_packaged():
    """A module added under web/ is in ui.py's fixed list and in the wheel's package data."""
    import fnmatch

    import tomllib

    from modelhost.api.ui import DASHBOARD_FILES, WEB_DIR

    on_disk = {
        str(p.relative_to(WEB_DIR)) for p in WEB_DIR.rglob("*") if p.suffix in (".js", ".css")
    }
    assert set(DASHBOARD_FILES) == on_disk
    pyproject = Path(__file__).parent.parent / "pyproject.toml"
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    for name in [*DASHBOARD_FILES, "index.html"]:
        assert any(fnmatch.fnmatch(f"web/{name}", p) for p in patterns["modelhost"]), name
