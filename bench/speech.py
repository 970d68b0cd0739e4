"""Speech over HTTP: time to first audio byte and real-time factor per TTS family, streamed
(``POST /v1/audio/speech``) and not (``POST /synthesize``), against the same model called
directly in this process.

Run it from the repository root::

    PYTHONPATH=src python bench/speech.py            # VITS, SpeechT5, Tacotron2, Bark; 5 rounds
    PYTHONPATH=src python bench/speech.py --rounds 9 --families vits,tacotron2

The models are the tiny real-architecture ones of ``tests/tiny_models.py``, built here with
random weights (the real checkpoints cannot be downloaded on this machine) and installed into a
``python -m modelhost serve`` subprocess: VITS, SpeechT5 and Bark from a loopback Hub
(``tests/hubserver.py``), Tacotron2 (torchaudio's Griffin-Lim bundle class, the tiny params)
through the torchaudio source from a loopback mirror (``tests/fileserver.py``,
``MODELHOST_TORCHAUDIO_MIRROR``). Their audio is noise, and how long it is depends on the random
weights and the caps: the tiny SpeechT5 stops after a few frames; the tiny Tacotron2's decoder
stops at its ``decoder_max_step`` (24 frames, 0.28 s) per call; the tiny Bark never emits its
end token and would generate its maximum of 768 semantic tokens (15 s of audio) per call, so
the bench caps them at ``BARK_SEMANTIC_TOKENS`` (150: 3 s of audio, about what a sentence
takes) in the built model's ``generation_config.json`` -- every path (direct, stream, whole)
reads the same file. A cap applies per call, so ``/synthesize`` of the whole text gives no
more audio than one sentence does for those two. The figures compare serving paths on the
same model, not model quality.

Each round alternates the order of three measurements of the same 4-sentence text and seed:

- ``direct``: in this process, on a thread of its own (as the server's worker),
  ``runtime.inference.synthesize`` sentence by sentence with the stream's seeds (the work the
  stream does): the time to the first sentence's audio, and to all of it — the reference.
  Tacotron2's is torchaudio itself: the bundle's own getters on the mirrored weight file, then
  ``infer`` and the Griffin-Lim vocoder per sentence, seeded as the stream seeds it;
- ``stream``: ``/v1/audio/speech`` with ``response_format`` pcm and mp3, read with httpx as
  it arrives: time to the first audio byte and to the last;
- ``whole``: ``/synthesize`` with the whole text in one call (no streaming): its first byte
  comes with the last.

It prints medians, the reference's own speed (ms, and the real-time factor: seconds of
compute per second of audio), the median per-round ratios stream/direct, and the seconds of
audio the pcm stream carried (its bytes at 24 kHz, 16-bit) beside the direct audio's: equal up
to resampling, so both did the same work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from modelhost_server import start_modelhost  # noqa: E402

TEXT = (
    "The quick brown fox jumps over the lazy dog. A second sentence follows the first one. "
    "Streaming sends each sentence when it is ready. The last sentence ends the text."
)
SEED = 1234
VOCODER = [{"role": "vocoder", "repo_id": "t/hifigan", "revision": "0" * 40, "path": "vocoder"}]
TTS = {"task": "text-to-speech"}
# The tiny Tacotron2 as a site's own torchaudio bundle (the tests' mechanism: tiny_models'
# tacotron2_bundle set on torchaudio.pipelines), Griffin-Lim vocoder: no WaveRNN file.
TACOTRON2_BUNDLE = "MH_BENCH_TINY_TACOTRON2_GRIFFINLIM_CHAR"
TACOTRON2_FILE = "mh_bench_tiny_tacotron2_char.pth"
# Bark's semantic tokens per call (49.9 a second of audio); the tiny model's default is 768.
BARK_SEMANTIC_TOKENS = 150
PCM_BYTES_PER_S = 24_000 * 2  # /v1/audio/speech's pcm: 24 kHz, 16-bit mono


@dataclass(frozen=True)
class Family:
    """A tiny model: where it installs from (source and model id: a Hub repo or a torchaudio
    bundle), the install request's extras, its in-process manifest, a line on its caps."""

    name: str
    model_id: str
    install: dict
    manifest_extra: dict = field(default_factory=dict)
    source: str = "huggingface"
    note: str = ""


FAMILIES = {
    "vits": Family("vits", "facebook/mms-tts-eng", TTS),
    "speecht5": Family(
        "speecht5",
        "microsoft/speecht5_tts",
        {**TTS, "include_vocoder": True},
        {"components": VOCODER},
    ),
    "tacotron2": Family(
        "tacotron2",
        TACOTRON2_BUNDLE,
        {"allow_pickle": True},
        source="torchaudio",
        note="decoder capped at 24 frames (0.28 s) a call by the tiny params, whole text too",
    ),
    "bark": Family(
        "bark",
        "suno/bark-small",
        TTS,
        note=f"semantic tokens capped at {BARK_SEMANTIC_TOKENS} a call (generation_config.json "
        f"edited here; the tiny Bark never ends by itself), whole text too",
    ),
}
DEFAULT_FAMILIES = "vits,speecht5,tacotron2,bark"


def build_models(root: Path, names: list[str]) -> dict[str, Path]:
    """The tiny models' directories (SpeechT5's vocoder apart, as the Hub has it)."""
    from tiny_models import build_bark, build_hifigan, build_speecht5, build_vits

    dirs: dict[str, Path] = {}
    if "vits" in names:
        dirs["vits"] = build_vits(root / "vits")
    if "speecht5" in names:
        dirs["speecht5"] = build_speecht5(root / "speecht5")
        dirs["hifigan"] = build_hifigan(root / "hifigan")
        # In this process: the layout an install with include_vocoder makes.
        dirs["speecht5_direct"] = Path(shutil.copytree(dirs["speecht5"], root / "speecht5-direct"))
        shutil.copytree(dirs["hifigan"], dirs["speecht5_direct"] / "vocoder")
    if "bark" in names:
        dirs["bark"] = cap_bark(build_bark(root / "bark"), BARK_SEMANTIC_TOKENS)
    if "tacotron2" in names:
        dirs["tacotron2"] = build_tacotron2(root / "tacotron2")
    return dirs


def cap_bark(directory: Path, tokens: int) -> Path:
    """Cap the built Bark's semantic tokens a call in its generation_config.json (BarkModel's
    generate reads ``semantic_config.max_new_tokens`` from it; the speech endpoint has no cap
    of its own): about a second a sentence here instead of the 768 tokens it never ends."""
    config_file = directory / "generation_config.json"
    config = json.loads(config_file.read_text("utf-8"))
    config["semantic_config"]["max_new_tokens"] = tokens
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")
    return directory


def build_tacotron2(directory: Path) -> Path:
    """The tiny Tacotron2's weight file (tests/tiny_models.py), for the mirror and for the
    direct reference; registers its bundle in this process's torchaudio.pipelines."""
    try:
        import torchaudio
    except ImportError as exc:
        raise SystemExit("tacotron2 needs torchaudio: pip install 'modelhost[audio]'") from exc
    from tiny_models import tacotron2_bundle, tacotron2_files

    directory.mkdir(parents=True)
    files = tacotron2_files(TACOTRON2_FILE, "unused-wavernn.pth")
    (directory / TACOTRON2_FILE).write_bytes(files[TACOTRON2_FILE])
    setattr(torchaudio.pipelines, TACOTRON2_BUNDLE, tacotron2_bundle(TACOTRON2_FILE, None))
    return directory


def register_tacotron2_in_server(site: Path) -> str:
    """A ``sitecustomize.py`` that registers the same bundle in the server subprocess (its
    torchaudio source and loader look bundles up in ``torchaudio.pipelines``); returns the
    PYTHONPATH that puts it first."""
    site.mkdir(parents=True)
    tests = Path(__file__).resolve().parent.parent / "tests"
    (site / "sitecustomize.py").write_text(
        '"""The bench\'s tiny Tacotron2 bundle, registered at start-up (bench/speech.py)."""\n'
        "import sys\n\n"
        f"sys.path.insert(0, {str(tests)!r})\n"
        "import torchaudio  # noqa: E402\n"
        "from tiny_models import tacotron2_bundle  # noqa: E402\n\n"
        f"setattr(torchaudio.pipelines, {TACOTRON2_BUNDLE!r}, "
        f"tacotron2_bundle({TACOTRON2_FILE!r}, None))\n",
        "utf-8",
    )
    return os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)


def install(base: str, family: Family) -> None:
    body = {
        "source": family.source,
        "model_id": family.model_id,
        "name": family.name,
        **family.install,
    }
    with httpx.Client(base_url=base, timeout=60) as client:
        answer = client.post("/models/download", json=body)
        if answer.status_code != 202:
            raise SystemExit(f"installing {family.name}: {answer.status_code} {answer.text}")
        job = answer.json()["download_id"]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = client.get(f"/models/download/status/{job}").json()
            if status["status"] in ("completed", "failed", "cancelled"):
                if status["status"] != "completed":
                    raise SystemExit(f"installing {family.name} failed: {status}")
                return
            time.sleep(0.1)
    raise SystemExit(f"installing {family.name} timed out")


def load_direct(family: Family, path: Path):
    import torch

    from modelhost.runtime.loaders import load
    from modelhost.store.manifest import Manifest

    manifest = Manifest(
        name=family.name,
        source="huggingface",
        model_id=family.model_id,
        task="text-to-speech",
        extra=family.manifest_extra,
    )
    return load(manifest, path, torch.device("cpu"))


# One sentence spoken directly with a seed; returns the seconds of audio it made.
Speak = Callable[[str, int], float]


def direct_speaker(family: Family, path: Path) -> Speak:
    """The reference: modelhost's runtime in this process, or torchaudio itself for
    Tacotron2 (models loaded once, untimed, as the server holds its model loaded)."""
    if family.source == "torchaudio":
        return tacotron2_speaker(path)
    from modelhost.runtime.inference import synthesize

    loaded = load_direct(family, path)
    return lambda sentence, seed: synthesize(loaded, sentence, seed=seed).duration_s


def tacotron2_speaker(directory: Path) -> Speak:
    """The bundle's own getters on the weight file the mirror serves, then ``infer`` and
    the vocoder with torch's generator seeded (its prenet dropout samples at inference)."""
    import torch
    import torchaudio

    bundle = getattr(torchaudio.pipelines, TACOTRON2_BUNDLE)
    local = {"model_dir": str(directory), "weights_only": True, "progress": False}
    tacotron2 = bundle.get_tacotron2(dl_kwargs=local)
    vocoder, processor = bundle.get_vocoder(), bundle.get_text_processor()

    def speak(sentence: str, seed: int) -> float:
        tokens, lengths = processor(sentence)
        with torch.inference_mode():
            torch.manual_seed(seed)
            spectrogram, frames, _ = tacotron2.infer(tokens, lengths)
            waveform, _ = vocoder(spectrogram, frames)
        return waveform.shape[-1] / vocoder.sample_rate

    return speak


def measure_direct(speak: Speak, sentences: list[str]) -> dict[str, float]:
    """In this process, sentence by sentence with the stream's seeds."""
    from modelhost.audio.speech import sentence_seed

    start = time.perf_counter()
    first, audio_s = None, 0.0
    for i, sentence in enumerate(sentences):
        audio_s += speak(sentence, sentence_seed(SEED, i))
        first = first if first is not None else time.perf_counter() - start
    return {"first": first, "total": time.perf_counter() - start, "audio_s": audio_s}


def measure_stream(client: httpx.Client, model: str, fmt: str) -> dict[str, float]:
    body = {"model": model, "input": TEXT, "response_format": fmt, "seed": SEED}
    start = time.perf_counter()
    first, size = None, 0
    with client.stream("POST", "/v1/audio/speech", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"/v1/audio/speech: {response.status_code} {response.read()!r}")
        for chunk in response.iter_raw():
            if chunk and first is None:
                first = time.perf_counter() - start
            size += len(chunk)
    return {"first": first or 0.0, "total": time.perf_counter() - start, "bytes": size}


class Refused(Exception):
    """The model refuses the whole text in one call (the tiny SpeechT5 takes 64 tokens)."""


def measure_whole(client: httpx.Client, model: str) -> dict[str, float]:
    body = {"model_name": model, "text": TEXT, "seed": SEED}
    start = time.perf_counter()
    response = client.post("/synthesize", json=body)
    if response.status_code == 400:
        raise Refused(response.json()["message"])
    if response.status_code != 200:
        raise SystemExit(f"/synthesize: {response.status_code} {response.text}")
    elapsed = time.perf_counter() - start
    return {"first": elapsed, "total": elapsed, "bytes": len(response.content)}


def bench_family(base: str, family: Family, path: Path, rounds: int) -> dict:
    from modelhost.audio.sentences import split_sentences

    speak = direct_speaker(family, path)
    sentences = split_sentences(TEXT)
    runs: dict[str, list[dict]] = {k: [] for k in ("direct", "pcm", "mp3", "whole")}
    steps = {
        "direct": lambda c: measure_direct(speak, sentences),
        "pcm": lambda c: measure_stream(c, family.name, "pcm"),
        "mp3": lambda c: measure_stream(c, family.name, "mp3"),
        "whole": lambda c: measure_whole(c, family.name),
    }
    with httpx.Client(base_url=base, timeout=600) as client, ThreadPoolExecutor(1) as worker:
        # The reference runs on a thread of its own, as the server's inference worker does:
        # on the main thread torch's OpenMP threads made the tiny models 5-10x slower on this
        # shared 2-core machine, which would flatter the server.
        direct = steps["direct"]
        steps["direct"] = lambda c: worker.submit(direct, c).result()
        refused = None
        for key, step in list(steps.items()):  # warm-up: first calls allocate and compile
            try:
                step(client)
            except Refused as exc:
                refused = f"/synthesize refuses the whole text: {exc}"
                del steps[key], runs[key]
        for r in range(rounds):
            order = list(steps) if r % 2 == 0 else list(reversed(steps))
            for key in order:
                runs[key].append(steps[key](client))
    figures = summarize(family.name, runs, len(sentences))
    return {**figures, "whole_refused": refused, "note": family.note}


def summarize(name: str, runs: dict[str, list[dict]], sentences: int) -> dict:
    def med(key: str, field_: str) -> float:
        return statistics.median(run[field_] for run in runs[key])

    def ratio(key: str, field_: str) -> float:
        pairs = zip(runs[key], runs["direct"], strict=True)
        return statistics.median(a[field_] / d[field_] for a, d in pairs)

    audio_s = med("direct", "audio_s")
    return {
        "family": name,
        "sentences": sentences,
        "rounds": len(runs["direct"]),
        "audio_s": round(audio_s, 3),
        "pcm_audio_s": round(med("pcm", "bytes") / PCM_BYTES_PER_S, 3),
        "direct_first_ms": round(1000 * med("direct", "first"), 1),
        "direct_total_ms": round(1000 * med("direct", "total"), 1),
        "direct_rtf": round(med("direct", "total") / audio_s, 3),
        "pcm_first_ms": round(1000 * med("pcm", "first"), 1),
        "pcm_total_ms": round(1000 * med("pcm", "total"), 1),
        "pcm_rtf": round(med("pcm", "total") / audio_s, 3),
        "mp3_first_ms": round(1000 * med("mp3", "first"), 1),
        "mp3_total_ms": round(1000 * med("mp3", "total"), 1),
        "pcm_first_over_direct_first": round(ratio("pcm", "first"), 2),
        "pcm_total_over_direct_total": round(ratio("pcm", "total"), 2),
        "mp3_total_over_direct_total": round(ratio("mp3", "total"), 2),
        **whole_figures(runs),
    }


def whole_figures(runs: dict[str, list[dict]]) -> dict:
    """/synthesize's first byte, and how much later it comes than the stream's."""
    if "whole" not in runs:
        return {"whole_first_ms": None, "whole_first_over_pcm_first": None}
    pairs = zip(runs["whole"], runs["pcm"], strict=True)
    return {
        "whole_first_ms": round(1000 * statistics.median(w["first"] for w in runs["whole"]), 1),
        "whole_first_over_pcm_first": round(
            statistics.median(w["first"] / p["first"] for w, p in pairs), 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--families", default=DEFAULT_FAMILIES, help=f"of {', '.join(FAMILIES)}")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON lines")
    args = parser.parse_args()
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = set(names) - set(FAMILIES)
    if unknown:
        raise SystemExit(f"unknown families {sorted(unknown)}; of {', '.join(FAMILIES)}")
    load_at_start = load_average()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        dirs = build_models(root / "models", names)
        env = serve_models(stack, root, names, dirs)
        process, base = start_modelhost(env)
        try:
            results = []
            for name in names:
                install(base, FAMILIES[name])
                direct_dir = dirs.get(f"{name}_direct", dirs[name])
                results.append(bench_family(base, FAMILIES[name], direct_dir, args.rounds))
        finally:
            process.terminate()
            process.wait(timeout=30)
    report(results, args.json, load_at_start)


def serve_models(
    stack: contextlib.ExitStack, root: Path, names: list[str], dirs: dict[str, Path]
) -> dict[str, str]:
    """Publish the built models (a loopback Hub; the torchaudio mirror for Tacotron2), both
    closed by ``stack``; returns the server's environment pointing at them."""
    from fileserver import FileServer
    from hubserver import HubServer

    hub = stack.enter_context(HubServer())
    for name in names:
        if FAMILIES[name].source == "huggingface":
            hub.add_repo(FAMILIES[name].model_id, dirs[name])
    if "speecht5" in names:
        hub.add_repo("microsoft/speecht5_hifigan", dirs["hifigan"])
    env = {
        "MODELHOST_HOME": str(root / "home"),
        "MODELHOST_HF_ENDPOINT": hub.base_url,
        "MODELHOST_HF_HUB_CACHE": str(root / "no-hf-cache"),
        "MODELHOST_URL_ALLOW_DEFAULTS": "false",
        "MODELHOST_DEVICE": "cpu",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    if "tacotron2" in names:
        mirror = stack.enter_context(FileServer())
        mirror.add(f"/audio/{TACOTRON2_FILE}", dirs["tacotron2"] / TACOTRON2_FILE)
        env["MODELHOST_TORCHAUDIO_MIRROR"] = mirror.url("/audio")
        env["PYTHONPATH"] = register_tacotron2_in_server(root / "site")
    return env


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages (it is shared: say how busy it was)."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def report(results: list[dict], as_json: bool, *load: str) -> None:
    print(f"cpu threads: {os.cpu_count()}, text: {len(TEXT)} characters")
    print(f"load average (1, 5, 15 min): at the start {load[0]}, at the end {load_average()}")
    for row in results:
        if as_json:
            print(json.dumps(row))
            continue
        print(
            f"{row['family']}: {row['sentences']} sentences, {row['audio_s']} s of audio "
            f"(the pcm stream carried {row['pcm_audio_s']} s), {row['rounds']} rounds (medians)"
            + (f"\n  {row['note']}" if row["note"] else "")
            + "\n"
            f"  direct (reference): first sentence {row['direct_first_ms']} ms, all "
            f"{row['direct_total_ms']} ms, RTF {row['direct_rtf']}\n"
            f"  stream pcm: first byte {row['pcm_first_ms']} ms "
            f"({row['pcm_first_over_direct_first']}x direct first), all {row['pcm_total_ms']} "
            f"ms ({row['pcm_total_over_direct_total']}x direct), RTF {row['pcm_rtf']}\n"
            f"  stream mp3: first byte {row['mp3_first_ms']} ms, all {row['mp3_total_ms']} ms "
            f"({row['mp3_total_over_direct_total']}x direct)\n"
            + (
                f"  /synthesize whole text: first byte {row['whole_first_ms']} ms "
                f"({row['whole_first_over_pcm_first']}x the stream's first byte)"
                if row["whole_refused"] is None
                else f"  {row['whole_refused']}"
            )
        )


if __name__ == "__main__":
    main()
