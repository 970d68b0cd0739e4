"""The client commands, each a thin mapping of flags onto one or a few API calls."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional

import typer

from modelhost.cli import pull as pulling
from modelhost.cli import render, serving
from modelhost.cli.app import app, client, err, handled, out, print_versions, state
from modelhost.cli.client import CliError

JSON = typer.Option(False, "--json", help="Print the server's JSON")
INPUTS = typer.Argument(..., metavar="INPUT...", help="one input, or several (a batch)")
# Players tried in order by `say --play`: the first found on PATH plays the file.
PLAYERS = (
    ["aplay", "-q"],
    ["paplay"],
    ["ffplay", "-nodisp", "-autoexit", "-loglevel", "quiet"],
    ["afplay"],
)


def _request_body(base: dict[str, Any], **flags: Any) -> dict[str, Any]:
    """The ``POST /models/download`` body: ``base`` (what the name resolved to) with the
    fields a flag set on top."""
    body = dict(base)
    body.update({key: value for key, value in flags.items() if value not in (None, False, [])})
    if flags.get("load") is False:
        body["load"] = False
    return body


def report(answer: dict, as_json: bool) -> None:
    """A changing command's answer: the server's JSON, or its message."""
    render.print_json(answer) if as_json else out.print(answer["message"], soft_wrap=True)


@app.command()
@handled
def pull(
    spec: str = typer.Argument(
        ...,
        metavar="MODEL",
        help="SOURCE:MODEL_ID (huggingface:org/model, url:https://host/m.safetensors), "
        "a Hub id org/model, or a catalog name (mms_tts_eng)",
    ),
    name: Optional[str] = typer.Option(None, "--name", help="Name here (default: from the id)"),  # noqa: UP045
    vocoder: bool = typer.Option(False, "--vocoder", help="Also fetch the TTS vocoder"),
    vocoder_model: Optional[str] = typer.Option(None, "--vocoder-model", help="Which vocoder"),  # noqa: UP045
    revision: Optional[str] = typer.Option(None, help="huggingface: branch, tag or commit"),  # noqa: UP045
    task: Optional[str] = typer.Option(None, help="Task (e.g. text-to-speech)"),  # noqa: UP045
    allow_pattern: list[str] = typer.Option([], "--allow-pattern", help="Only matching files"),
    ignore_pattern: list[str] = typer.Option([], "--ignore-pattern", help="Skip matching files"),
    sha256: Optional[str] = typer.Option(None, help="url: the file's expected sha256"),  # noqa: UP045
    filename: Optional[str] = typer.Option(None, help="url: the file's name here"),  # noqa: UP045
    load_as: Optional[str] = typer.Option(None, help="url: torchscript or torchvision:<arch>"),  # noqa: UP045
    no_load: bool = typer.Option(False, "--no-load", help="Install without loading"),
    device: Optional[str] = typer.Option(None, help="Device to load on"),  # noqa: UP045
    pin: bool = typer.Option(False, "--pin", help="Keep the model loaded (never evicted)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled weights"),
    experimental: bool = typer.Option(False, "--experimental", help="Allow experimental models"),
    enable_large_model: bool = typer.Option(
        False, "--enable-large-model", help="Allow models above the size limit"
    ),
    force: bool = typer.Option(False, "--force", help="Download again even if installed"),
    detach: bool = typer.Option(False, "--detach", help="Print the id and return at once"),
    as_json: bool = JSON,
) -> None:
    """Download a model, with live progress (Ctrl-C asks whether to cancel)."""
    body = _request_body(
        pulling.resolve(client(), spec),
        name=name,
        task=task,
        include_vocoder=vocoder,
        vocoder_model=vocoder_model,
        revision=revision,
        allow_patterns=allow_pattern,
        ignore_patterns=ignore_pattern,
        sha256=sha256,
        filename=filename,
        load_as=load_as,
        load=not no_load,
        device=device,
        pin=pin,
        allow_pickle=allow_pickle,
        experimental=experimental,
        enable_large_model=enable_large_model,
    )
    _after_submit(submit(body, force), detach, as_json)


def submit(body: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """``POST /models/download``; with ``force``, an installed model is downloaded again."""
    answer = client().post_status("/models/download", body)[1]
    if answer.get("status") == "already_exists" and force:
        # The server re-downloads an installed model through a forced retry.
        answer = client().post(
            "/models/manage",
            params={
                "action": "retry_download",
                "model_name": body["name"],
                "force_redownload": True,
            },
        )
    return answer


def follow_job(answer: dict[str, Any], as_json: bool) -> dict[str, Any]:
    """Draw a submitted job's bars until it ends (on stderr under ``--json``, so stdout
    stays the JSON); its final state. Ctrl-C asks whether to cancel it."""
    download_id = answer["download_id"]
    if not as_json:
        out.print(f"{answer.get('message')}  (id {download_id})", soft_wrap=True)
    try:
        return pulling.follow(client(), download_id, err if as_json else out)
    except KeyboardInterrupt:
        raise typer.Exit(pulling.ask_cancel(client(), download_id, out)) from None


def install(body: dict[str, Any], as_json: bool) -> None:
    """Install ``body`` as ``pull`` does (bars, phases); return once it completed, or
    exit 1 with the job's message (``run``'s first step)."""
    answer = submit(body)
    if answer.get("status") == "already_exists":
        return
    final = follow_job(answer, as_json)
    completed = final.get("status") == "completed"
    code = pulling.outcome(final, err if as_json or not completed else out)
    if not completed:
        raise typer.Exit(code)


def _after_submit(answer: dict[str, Any], detach: bool, as_json: bool) -> None:
    """Report the POST's answer, then follow the job unless detached or already installed."""
    if answer.get("status") == "already_exists" or detach:
        if as_json:
            render.print_json(answer)
        elif detach and answer.get("status") != "already_exists":
            typer.echo(answer["download_id"])
        else:
            out.print(answer.get("message") or "already installed", soft_wrap=True)
        return
    final = follow_job(answer, as_json)
    if as_json:
        render.print_json(final)
        raise typer.Exit(0 if final.get("status") == "completed" else 1)
    raise typer.Exit(pulling.outcome(final, out if final.get("status") == "completed" else err))


@app.command("ls")
@handled
def list_installed(as_json: bool = JSON) -> None:
    """Installed models: name, source, size, revision, loaded."""
    api = client()
    cache = api.get("/models/cache/info")  # its installed_models: one row per model
    managed = api.get("/models/managed")
    if as_json:
        render.print_json({"cache_info": cache, "managed": managed})
        return
    loaded = {row["name"] for row in managed["downloaded_models"]}
    out.print(render.installed_table(cache["installed_models"], loaded))
    out.print(
        f"{cache['total_models']} model(s), {render.human_bytes(cache['total_size_bytes'])}"
        f" in {cache['cache_directory']}",
        highlight=False,
    )


@app.command()
@handled
def ps(as_json: bool = JSON) -> None:
    """Loaded models: device, memory, pinned, idle time."""
    managed = client().get("/models/managed")
    if as_json:
        render.print_json(managed)
        return
    out.print(render.managed_table(managed["downloaded_models"]))


@app.command()
@handled
def rm(name: str, as_json: bool = JSON) -> None:
    """Remove a model from the cache (no prompt)."""
    answer = client().delete(f"/models/download/{name}")
    report(answer, as_json)


@app.command()
@handled
def show(name: str, as_json: bool = JSON) -> None:
    """An installed model's manifest."""
    info = client().get(f"/models/download/{name}/info")
    render.print_json(info) if as_json else render.show_manifest(out, info)


@app.command()
@handled
def load(
    name: str,
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N or mps"),  # noqa: UP045
    pin: bool = typer.Option(False, "--pin", help="Never evict this model"),
    as_json: bool = JSON,
) -> None:
    """Load an installed model onto a device."""
    body = {key: value for key, value in {"device": device, "pin": pin}.items() if value}
    answer = client().post(f"/models/{name}/load", body)
    report(answer, as_json)


@app.command()
@handled
def unload(name: str, as_json: bool = JSON) -> None:
    """Unload a model and free its memory."""
    answer = client().post(f"/models/{name}/unload")
    report(answer, as_json)


@app.command()
@handled
def say(
    text: str,
    model: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "-m",
        "--model",
        help="A text-to-speech model (default: the only loaded one, else "
        "$MODELHOST_DEFAULT_TTS, else the only installed one)",
    ),
    output: Path = typer.Option(Path("out.wav"), "-o", "--output", help="WAV file to write"),
    speaker: Optional[str] = typer.Option(None, help="Voice preset / speaker id (JSON ok)"),  # noqa: UP045
    seed: Optional[int] = typer.Option(None, help="Random seed (same seed, same audio)"),  # noqa: UP045
    play: bool = typer.Option(False, "--play", help="Play the file once written"),
) -> None:
    """Text to speech: write the server's WAV to a file (and play it)."""
    model = model or serving.choose_tts(client())
    serving.ensure_loaded(client(), model)
    value = None if speaker is None else _parse_value(speaker)
    write_speech(model, text, output, speaker=value, seed=seed)
    if play:
        _play(output)


def write_speech(
    model: str, text: str, output: Path, quiet: bool = False, **options: Any
) -> dict[str, Any]:
    """Speak ``text`` with ``model`` into the WAV file ``output``; print what was written
    (path, duration, model) unless ``quiet``, and return those facts."""
    data = serving.synthesize(client(), model, text, **options)
    try:
        output.write_bytes(data)
    except OSError as exc:
        raise CliError(f"cannot write {output}: {exc.strerror}") from None
    facts = {"model_name": model, "output": str(output), "bytes": len(data)}
    facts.update(serving.wav_facts(data))
    if quiet:
        return facts
    out.print(
        f"wrote {output} ({facts['duration_s']:.2f} s at {facts['sample_rate']} Hz, "
        f"{len(data)} bytes) with {model}",
        soft_wrap=True,
    )
    return facts


def _play(path: Path) -> None:
    for player in PLAYERS:
        if shutil.which(player[0]):
            subprocess.run([*player, str(path)], check=False)
            return
    raise CliError("no audio player found: install aplay, paplay, ffplay or afplay")


def _parse_value(text: str) -> Any:
    """A flag's value as JSON when it parses (numbers, lists), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@app.command()
@handled
def predict(
    name: str,
    inputs: list[str] = INPUTS,
    param: list[str] = typer.Option([], "--param", help="k=v (v parsed as JSON when it can)"),
) -> None:
    """Run a loaded model on one or more inputs; prints the JSON result."""
    parameters: dict[str, Any] = {}
    for item in param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--param wants key=value, got {item!r}")
        parameters[key] = _parse_value(value)
    body: dict[str, Any] = {"inputs": inputs[0] if len(inputs) == 1 else inputs}
    if parameters:
        body["parameters"] = parameters
    render.print_json(client().post(f"/models/{name}/predict", body))


@app.command()
@handled
def status(
    download_id: Optional[str] = typer.Argument(None, metavar="[ID]"),  # noqa: UP045
    as_json: bool = JSON,
) -> None:
    """One download's state, or every download (newest first)."""
    if download_id:
        job = client().get(f"/models/download/status/{download_id}")
        render.print_json(job) if as_json else out.print(render.jobs_table([job]))
        return
    jobs = client().get("/models/downloads")
    render.print_json(jobs) if as_json else out.print(render.jobs_table(jobs["downloads"]))


@app.command()
@handled
def cancel(download_id: str, as_json: bool = JSON) -> None:
    """Cancel a download."""
    answer = client().post(f"/models/download/{download_id}/cancel")
    if as_json:
        render.print_json(answer)
    else:
        out.print(f"{answer['status']}: {answer.get('message') or ''}", soft_wrap=True)


@app.command()
@handled
def catalog(as_json: bool = JSON) -> None:
    """The catalog of downloadable models."""
    body = client().get("/models/available")
    render.print_json(body) if as_json else out.print(render.catalog_table(body))


@app.command()
def version() -> None:
    """The client's version, and the server's when one answers."""
    current = state()
    print_versions(current.url, current.api_key)
