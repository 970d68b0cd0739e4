"""The web dashboard and the offline API docs, driven in Debian's headless Chromium.

Every request the page makes is recorded: none may go to a host other than the server's.
The panels' own tests (pull, load failures, history, speak, try-it, screenshot) are in
``test_dashboard_panels.py``, which uses this module's fixtures.
"""

from __future__ import annotations

import os
import re
import time

import pytest
from conftest import need_module, need_tool
from hubserver import HubServer
from tiny_models import publish_all

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MB = 1_000_000
BIG = {"weights.bin": os.urandom(15 * MB)}

sync_api = need_module("playwright.sync_api", "pip install playwright")
need_tool(CHROMIUM, "needs Debian's chromium: apt-get install chromium", module_level=True)


@pytest.fixture(scope="module")
def hub(tiny_models):
    with HubServer(rate_bytes_per_s=5 * MB) as server:
        publish_all(server, tiny_models)
        server.add_repo("test-org/big", BIG, lfs_threshold=1000)
        yield server


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def modelhost(make_server, hub, tmp_path):
    def start(**overrides):
        values = {"hf_endpoint": hub.base_url, "hf_hub_cache": tmp_path / "none", "device": "cpu"}
        values.update(overrides)
        return make_server([], **values)

    return start


class Page:
    """A page on the server that records where each of its requests went."""

    def __init__(self, browser, server) -> None:
        self.server = server
        self.page = browser.new_page()
        self.requests: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))

    def foreign(self, tolerated: tuple[str, ...] = ()) -> list[str]:
        own = self.server.base_url + "/"
        return [
            url
            for url in self.requests
            if not url.startswith((own, "blob:", "data:")) and not url.startswith(tolerated)
        ]


def install(server, repo_id: str, name: str, **extra) -> None:
    body = {"source": "huggingface", "model_id": repo_id, "name": name, **extra}
    answer = server.client.post("/models/download", json=body)
    assert answer.status_code == 202, answer.text
    assert server.wait_for(answer.json()["download_id"], timeout=120)["status"] == "completed"


def installed_row(page, name: str):
    return page.locator(f'#installed tr[data-name="{name}"]')


def test_dashboard_lists_deletes_installs_speaks_and_stays_on_the_server(browser, modelhost):
    server = modelhost()
    install(server, "test-org/tiny-bert", "bert", load=False)
    view = Page(browser, server)
    page = view.page
    page.goto(server.base_url + "/")
    row = installed_row(page, "bert")
    row.wait_for()
    cache = server.client.get("/models/cache/info").json()
    (model,) = cache["installed_models"]
    assert row.locator(".size").inner_text() == f"{model['size_bytes'] / 1e6:.1f} MB"
    assert row.locator(".state").inner_text() == "not loaded"
    assert (model["name"], model["model_id"]) == ("bert", "test-org/tiny-bert")

    # Install from the catalog: mms_tts_eng comes from the (loopback) Hub and gets loaded.
    page.locator('#catalog tr[data-name="mms_tts_eng"] button').click()
    installed_row(page, "mms_tts_eng").wait_for(timeout=60_000)
    info = server.client.get("/models/download/mms_tts_eng/info")
    assert info.status_code == 200 and info.json()["source"] == "huggingface"
    page.locator('#installed tr[data-name="mms_tts_eng"] .state').filter(
        has_text="loaded on cpu"
    ).wait_for(timeout=30_000)
    assert [
        m["name"] for m in server.client.get("/models/managed").json()["downloaded_models"]
    ] == ["mms_tts_eng"]

    # Speak: the audio element gets a source the browser decodes.
    page.select_option("#speak-model", "mms_tts_eng")
    page.select_option("#speak-format", "wav")
    page.click("#speak-submit")
    page.wait_for_function(
        "() => { const a = document.getElementById('speak-audio');"
        " return a.src.startsWith('blob:') && a.readyState >= 1 && a.duration > 0; }",
        timeout=60_000,
    )
    duration = page.evaluate("document.getElementById('speak-audio').duration")
    assert 0 < duration < 60

    # Delete with its button: gone from the page and from the server.
    page.locator('#installed tr[data-name="bert"] button', has_text="Delete").click()
    installed_row(page, "bert").wait_for(state="detached")
    assert server.client.get("/models/download/bert/info").status_code == 404
    assert view.foreign() == []
    page.close()


def test_live_download_bar_moves_to_completion(browser, modelhost):
    server = modelhost()
    view = Page(browser, server)
    page = view.page
    page.goto(server.base_url + "/ui")
    page.locator("#installed").wait_for()
    time.sleep(0.5)  # the page's /events stream is open
    body = {"source": "huggingface", "model_id": "test-org/big", "name": "big", "load": False}
    answer = server.client.post("/models/download", json=body).json()
    card = page.locator(f'.job[data-id="{answer["download_id"]}"]')
    bar = card.locator("progress.total")
    values = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if card.count() and card.get_attribute("data-status") == "completed":
            break  # an ended job's card shows its message, not a bar
        if bar.count():
            value = float(bar.get_attribute("value") or 0)
            if not values or value != values[-1]:
                values.append(value)
        time.sleep(0.1)
    assert card.get_attribute("data-status") == "completed"
    assert len([v for v in values if 0 < v < 100]) >= 2, values  # seen moving
    assert values == sorted(values)
    status = server.client.get(f"/models/download/status/{answer['download_id']}").json()
    assert card.locator(".message").inner_text() == status["message"]
    assert (
        card.locator(".job-meta").inner_text().startswith(f"{status['bytes_total'] / 1e6:.1f} MB")
    )
    installed_row(page, "big").wait_for()
    assert view.foreign() == []
    page.close()


def test_api_key_is_asked_once_and_kept_in_session_storage(browser, modelhost):
    server = modelhost(api_key="s3cret")
    headers = {"Authorization": "Bearer s3cret"}
    answer = server.client.post(
        "/models/download",
        json={
            "source": "huggingface",
            "model_id": "test-org/tiny-bert",
            "name": "bert",
            "load": False,
        },
        headers=headers,
    )
    assert answer.status_code == 202
    server.client.headers.update(headers)
    server.wait_for(answer.json()["download_id"])
    view = Page(browser, server)
    page = view.page
    page.goto(server.base_url + "/")
    page.locator("#key-input").wait_for()
    page.fill("#key-input", "s3cret")
    page.click("#key-form button")
    installed_row(page, "bert").wait_for()
    assert page.evaluate("sessionStorage.getItem('modelhost-api-key')") == "s3cret"
    assert page.locator("#key-form").is_hidden()
    page.close()


def test_docs_and_redoc_render_with_no_outside_request(browser, modelhost):
    server = modelhost()
    view = Page(browser, server)
    page = view.page
    page.goto(server.base_url + "/docs")
    page.get_by_text("/models/download/status/{download_id}").first.wait_for(timeout=30_000)
    page.goto(server.base_url + "/redoc")
    page.get_by_text("Download a model into the verified cache").first.wait_for(
        state="attached", timeout=30_000
    )
    # ReDoc's own logo image is the one outside request tolerated.
    outside = view.foreign(tolerated=("https://cdn.redoc.ly/",))
    assert outside == []
    assert any(re.search(r"/static/docs/swagger-ui-bundle\.js$", u) for u in view.requests)
    assert any(u.endswith("/static/docs/redoc.standalone.js") for u in view.requests)
    page.close()
