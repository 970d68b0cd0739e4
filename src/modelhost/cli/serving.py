"""What the server holds and serves, as ``say`` and ``run`` need it: installed and loaded
models, loading before use, the default text-to-speech model, and speech as a WAV file."""

from __future__ import annotations

import io
import os
import wave
from typing import Any

from modelhost.cli.client import Client, CliError

# The TTS model `say` uses when no -m is given and no single TTS model is loaded.
DEFAULT_TTS_ENV = "MODELHOST_DEFAULT_TTS"


def installed(client: Client) -> list[dict[str, Any]]:
    """Every installed model's row (``GET /models/cache/info``: name, task, is_tts ...)."""
    return client.get("/models/cache/info")["installed_models"]


def loaded(client: Client) -> list[dict[str, Any]]:
    """Every loaded model's row (``GET /models/managed``: name, task, is_tts, sample_rate ...)."""
    return client.get("/models/managed")["downloaded_models"]


def ensure_loaded(client: Client, name: str) -> dict[str, Any]:
    """The loaded model's row, loading it first when it is not loaded.

    The server may load on first use by itself (MODELHOST_LOAD_ON_DEMAND); loading here
    works whatever that setting is, and the row says the task the model serves."""
    for row in loaded(client):
        if row["name"] == name:
            return row
    return client.post(f"/models/{name}/load")  # its answer carries the same row fields


def choose_tts(client: Client) -> str:
    """The model ``say`` speaks with when none is named: the only loaded TTS model, else
    ``MODELHOST_DEFAULT_TTS``, else the only installed TTS model; otherwise an error that
    lists the choices."""
    speaking = [row["name"] for row in loaded(client) if row.get("is_tts")]
    if len(speaking) == 1:
        return speaking[0]
    default = os.environ.get(DEFAULT_TTS_ENV)
    if default:
        return default
    choices = [row["name"] for row in installed(client) if row.get("is_tts")]
    if len(choices) == 1:
        return choices[0]
    if not choices:
        raise CliError(
            "no text-to-speech model is installed: install one (e.g. `modelhost pull "
            "mms_tts_eng`), then pass it with -m"
        )
    listed = ", ".join(name + (" (loaded)" if name in speaking else "") for name in choices)
    raise CliError(
        f"several text-to-speech models: pass one with -m NAME or set {DEFAULT_TTS_ENV}; "
        f"installed: {listed}"
    )


def synthesize(client: Client, model: str, text: str, **options: Any) -> bytes:
    """The WAV bytes of ``text`` spoken by ``model`` (``POST /synthesize``); ``options``
    (speaker, seed) are sent when set."""
    body: dict[str, Any] = {"model_name": model, "text": text}
    body.update({key: value for key, value in options.items() if value is not None})
    return client.request("POST", "/synthesize", json=body).content


def wav_facts(data: bytes) -> dict[str, Any]:
    """A WAV's sample rate, frames and duration, read from its header."""
    try:
        with wave.open(io.BytesIO(data)) as reader:
            rate, frames = reader.getframerate(), reader.getnframes()
    except (wave.Error, EOFError) as exc:
        raise CliError(f"the server's audio is not a WAV file: {exc}") from None
    return {"sample_rate": rate, "frames": frames, "duration_s": round(frames / rate, 3)}
