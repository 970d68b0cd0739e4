"""Speech over HTTP: time to first audio byte and real-time factor per TTS family, streamed
(``POST /v1/audio/speech``) and not (``POST /synthesize``), against the same model called
directly in this process.

Run it from the repository root::

    PYTHONPATH=src python bench/speech.py                 # VITS and SpeechT5, 5 rounds
    PYTHONPATH=src python bench/speech.py --rounds 9 --families vits
    PYTHONPATH=src python bench/speech.py --families bark  # slow: see below

The models are the tiny real-architecture ones of ``tests/tiny_models.py``, built here with
random weights (the real checkpoints cannot be downloaded on this machine), published on a
loopback Hub (``tests/hubserver.py``) and installed into a ``python -m modelhost serve``
subprocess. Their audio is noise, and how long it is depends on the random weights: the tiny
SpeechT5 stops after a few frames, the tiny Bark never emits its end token and generates its
maximum (about 15 s of audio, 90 s of CPU per sentence here), so Bark is left out unless asked
for. The figures compare serving paths on the same model, not model quality.

Each round alternates the order of three measurements of the same 4-sentence text and seed:

- ``direct``: in this process, on a thread of its own (as the server's worker),
  ``runtime.inference.synthesize`` sentence by sentence with the stream's seeds (the work the
  stream does): the time to the first sentence's audio, and to all of it — the reference;
- ``stream``: ``/v1/audio/speech`` with ``response_format`` pcm and mp3, read with httpx as
  it arrives: time to the first audio byte and to the last;
- ``whole``: ``/synthesize`` with the whole text in one call (no streaming): its first byte
  comes with the last.

It prints medians, the reference's own speed (ms, and the real-time factor: seconds of
compute per second of audio) and the median per-round ratios stream/direct.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
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


@dataclass(frozen=True)
class Family:
    """A tiny model: its Hub repo, the install request's extras, its in-process manifest."""

    name: str
    repo: str
    install: dict
    manifest_extra: dict = field(default_factory=dict)


FAMILIES = {
    "vits": Family("vits", "facebook/mms-tts-eng", {}),
    "speecht5": Family(
        "speecht5", "microsoft/speecht5_tts", {"include_vocoder": True}, {"components": VOCODER}
    ),
    "bark": Family("bark", "suno/bark-small", {}),
}


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
        dirs["bark"] = build_bark(root / "bark")
    return dirs


def install(base: str, family: Family) -> None:
    body = {
        "source": "huggingface",
        "model_id": family.repo,
        "name": family.name,
        "task": "text-to-speech",
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
        model_id=family.repo,
        task="text-to-speech",
        extra=family.manifest_extra,
    )
    return load(manifest, path, torch.device("cpu"))


def measure_direct(loaded, sentences: list[str]) -> dict[str, float]:
    """In this process, sentence by sentence with the stream's seeds."""
    from modelhost.audio.speech import sentence_seed
    from modelhost.runtime.inference import synthesize

    start = time.perf_counter()
    first, audio_s = None, 0.0
    for i, sentence in enumerate(sentences):
        audio = synthesize(loaded, sentence, seed=sentence_seed(SEED, i))
        audio_s += audio.duration_s
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

    loaded = load_direct(family, path)
    sentences = split_sentences(TEXT)
    runs: dict[str, list[dict]] = {k: [] for k in ("direct", "pcm", "mp3", "whole")}
    steps = {
        "direct": lambda c: measure_direct(loaded, sentences),
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
    return {**summarize(family.name, runs, len(sentences)), "whole_refused": refused}


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
    parser.add_argument("--families", default="vits,speecht5", help="of vits, speecht5, bark")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON lines")
    args = parser.parse_args()
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = set(names) - set(FAMILIES)
    if unknown:
        raise SystemExit(f"unknown families {sorted(unknown)}; of {', '.join(FAMILIES)}")
    from hubserver import HubServer

    with tempfile.TemporaryDirectory() as tmp, HubServer() as hub:
        root = Path(tmp)
        dirs = build_models(root / "models", names)
        for name in names:
            hub.add_repo(FAMILIES[name].repo, dirs[name])
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
    report(results, args.json)


def report(results: list[dict], as_json: bool) -> None:
    print(f"cpu threads: {os.cpu_count()}, text: {len(TEXT)} characters")
    for row in results:
        if as_json:
            print(json.dumps(row))
            continue
        print(
            f"{row['family']}: {row['sentences']} sentences, {row['audio_s']} s of audio, "
            f"{row['rounds']} rounds (medians)\n"
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
