"""``modelhost run``: from a name to a result in one command, as ``ollama run`` does.

The name is resolved as ``pull`` resolves it (or names an installed model); a model not
installed is pulled with ``pull``'s bars, loaded if it is not, and run by the task it
serves: speech to a WAV file, embeddings, labels, generated text, a transcript.
"""

from __future__ import annotations

import base64
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from modelhost.cli import pull as pulling
from modelhost.cli import render, serving
from modelhost.cli.app import app, client, handled, out
from modelhost.cli.client import CliError
from modelhost.cli.commands import JSON, install, write_speech

WORDS = typer.Argument(
    None,
    metavar="TEXT",
    help="The input: text (else read from a pipe), or an audio/image file's path",
)
# How many leading values of an embedding are shown (--json prints them all).
SHOWN_VALUES = 8


def _model_for(spec: str, task: str | None, as_json: bool) -> str:
    """The installed model ``spec`` names, installing (and loading) it first if needed."""
    rows = {row["name"]: row for row in serving.installed(client())}
    if spec in rows:
        return spec
    body = pulling.resolve(client(), spec, list(rows))
    same = rows.get(body["name"], {}).get("model_id") == body["model_id"]
    if not same:
        # Not installed, or its name holds another model: the server installs it, or says
        # what is in the way (409 naming the difference).
        install({**body, **({"task": task} if task else {})}, as_json)
    return body["name"]


def _text(words: list[str], what: str) -> str:
    """The words as one text, else stdin when it is piped; an error saying what to pass."""
    text = " ".join(words).strip()
    if not text and not sys.stdin.isatty():
        text = sys.stdin.read().strip()
    if not text:
        raise CliError(f"nothing to run on: pass {what} as TEXT, or pipe it on stdin")
    return text


def _file(words: list[str], what: str) -> Path:
    """The file TEXT names (an audio or image input)."""
    path = Path(" ".join(words))
    if not words or not path.is_file():
        shown = f" ({path} is not a file)" if words else ""
        raise CliError(f"pass the {what} file to read as TEXT{shown}")
    return path


def _predict(model: str, inputs: Any) -> dict[str, Any]:
    return client().post(f"/models/{model}/predict", {"inputs": inputs})


def _print_ranked(predictions: list[dict[str, Any]]) -> None:
    for row in predictions:
        out.print(f"{row['score']:.4f}  {row['label']}", soft_wrap=True)


def speak(model: str, words: list[str], output: Path | None, as_json: bool) -> None:
    """Text to speech into ``output`` (default ``MODEL.wav`` here)."""
    text = _text(words, "the text to speak")
    facts = write_speech(model, text, output or Path(f"{model}.wav"), quiet=as_json)
    if as_json:
        render.print_json(facts)


def embed(model: str, words: list[str], output: Path | None, as_json: bool) -> None:
    """The text's embedding: its dimension and first values."""
    answer = _predict(model, _text(words, "the text to embed"))
    if as_json:
        render.print_json(answer)
        return
    vector = answer["embeddings"][0]
    head = ", ".join(f"{value:.4f}" for value in vector[:SHOWN_VALUES])
    more = ", ..." if len(vector) > SHOWN_VALUES else ""
    out.print(f"dimension {answer['dimension']}: [{head}{more}]", soft_wrap=True)


def classify(model: str, words: list[str], output: Path | None, as_json: bool) -> None:
    """The text's labels, best first, with their scores."""
    answer = _predict(model, _text(words, "the text to classify"))
    render.print_json(answer) if as_json else _print_ranked(answer["predictions"])


def generate(model: str, words: list[str], output: Path | None, as_json: bool) -> None:
    """The text the model generates from the prompt."""
    answer = _predict(model, _text(words, "the prompt"))
    render.print_json(answer) if as_json else out.print(answer["generated_text"], soft_wrap=True)


def transcribe(model: str, words: list[str], output: Path | None, as_json: bool) -> None:
    """The audio file's transcript (``/v1/audio/transcriptions``: any format FFmpeg reads)."""
    path = _file(words, "audio")
    answer = client().post_form(
        "/v1/audio/transcriptions",
        {"model": model, "response_format": "json"},
        {"file": (path.name, path.read_bytes())},
    )
    render.print_json(answer) if as_json else out.print(answer["text"], soft_wrap=True)


def classify_image(model: str, words: list[str], output: Path | None, as_json: bool) -> None:
    """The image file's labels, best first."""
    image = base64.b64encode(_file(words, "image").read_bytes()).decode()
    answer = _predict(model, image)
    render.print_json(answer) if as_json else _print_ranked(answer["predictions"])


Runner = Callable[[str, list[str], Path | None, bool], None]
# The server's task names (its canonical ones and the Hub's aliases) -> how to run them.
RUNNERS: dict[str, Runner] = {
    "text-to-speech": speak,
    "text-to-audio": speak,
    "feature-extraction": embed,
    "sentence-similarity": embed,
    "text-classification": classify,
    "sentiment-analysis": classify,
    "text-generation": generate,
    "text2text-generation": generate,
    "summarization": generate,
    "translation": generate,
    "automatic-speech-recognition": transcribe,
    "image-classification": classify_image,
}


def runner_for(row: dict[str, Any]) -> Runner:
    """How to run the loaded model ``row`` describes (``is_tts`` wins over its task)."""
    if row.get("is_tts"):
        return speak
    task = row.get("task") or "unknown"
    if task not in RUNNERS:
        raise CliError(
            f"modelhost run does not know how to run a {task} model: use "
            f"`modelhost predict {row['name']} INPUT`"
        )
    return RUNNERS[task]


@app.command()
@handled
def run(
    name: str = typer.Argument(
        ...,
        metavar="NAME",
        help="An installed model, a catalog name (mms_tts_eng), a Hub id org/model or "
        "SOURCE:MODEL_ID",
    ),
    words: Optional[list[str]] = WORDS,  # noqa: UP045
    output: Optional[Path] = typer.Option(  # noqa: UP045
        None, "-o", "--output", help="Speech: the WAV file to write (default NAME.wav)"
    ),
    task: Optional[str] = typer.Option(  # noqa: UP045
        None, "--task", help="When installing: the task, if the model's config does not say"
    ),
    as_json: bool = JSON,
) -> None:
    """Run a model on TEXT, pulling and loading it first when needed."""
    model = _model_for(name, task, as_json)
    row = serving.ensure_loaded(client(), model)
    runner_for(row)(model, words or [], output, as_json)
