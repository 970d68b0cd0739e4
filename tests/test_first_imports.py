"""Concurrent first loads on a fresh server all load: transformers is imported whole once.

transformers puts its lazy module in ``sys.modules`` before its first import ends; a thread
that imported it meanwhile got a module without its classes. Three models installed at once
on a fresh ``modelhost serve`` whose warm-up had not imported the runtime (downloads skip
it) loaded in three job threads at once, and one or two failed with "module 'transformers'
has no attribute 'BarkModel'" (the API contract's own examples, run on a plain install).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import httpx
from conftest import serve_subprocess
from hubserver import HubServer
from tiny_models import publish_all

# The API contract's own requests (its names), plus two Transformers models.
MODELS = {
    "bark_tts": {"model_id": "suno/bark-small", "task": "text-to-speech"},
    "speecht5_tts": {
        "model_id": "microsoft/speecht5_tts",
        "task": "text-to-speech",
        "include_vocoder": True,
    },
    "bart": {"model_id": "test-org/tiny-bart"},
    "bert": {"model_id": "test-org/tiny-bert"},
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_models_installed_at_once_on_a_fresh_server_all_load(tiny_models, tmp_path: Path):
    port = _free_port()
    with HubServer() as hub:
        publish_all(hub, tiny_models)
        env = {
            **os.environ,
            "MODELHOST_HOME": str(tmp_path / "home"),
            "MODELHOST_WARM_UP": "false",
            "MODELHOST_URL_ALLOW_DEFAULTS": "false",
            "HF_ENDPOINT": hub.base_url,
            "HF_HUB_CACHE": str(tmp_path / "no-hf-cache"),
            "MODELHOST_DEVICE": "cpu",
        }
        server = serve_subprocess(port, env)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                ids = {}
                for name, fields in MODELS.items():
                    body = {"source": "huggingface", "name": name, **fields}
                    answer = client.post("/models/download", json=body)
                    assert answer.status_code == 202, answer.text
                    ids[name] = answer.json()["download_id"]
                final = {}
                deadline = time.monotonic() + 120
                while len(final) < len(ids) and time.monotonic() < deadline:
                    for name, download_id in ids.items():
                        state = client.get(f"/models/download/status/{download_id}").json()
                        if state["status"] in ("completed", "failed", "cancelled"):
                            final[name] = (state["status"], state.get("message"))
                    time.sleep(0.1)
                loaded = {
                    row["name"]
                    for row in client.get("/models/managed").json()["downloaded_models"]
                    if row["loaded"]
                }
        finally:
            server.terminate()
            server.wait(timeout=30)
    assert final == {name: ("completed", final[name][1]) for name in MODELS}, final
    assert loaded == set(MODELS)
