"""Tacotron2 text to speech through the server vs bare torchaudio, and what a vocoder costs.

Run it from the repository root, with the package, its test extras and torchaudio installed::

    python bench/tacotron2.py                    # 3 rounds, WaveRNN timed on 40 frames
    python bench/tacotron2.py --rounds 5 --wavernn-frames 80

It builds a full-size Tacotron2 with random (seeded) weights under the file name of
torchaudio's ``TACOTRON2_GRIFFINLIM_CHAR_LJSPEECH`` bundle, serves it from a loopback mirror
(``tests/fileserver.py``) and installs it into a modelhost server subprocess through the
torchaudio source. Each round, alternating the order:

- *modelhost*: ``POST /synthesize`` (same text, same seed) timed until the WAV arrives.
- *bare*: in this process, ``tacotron2.infer`` and the Griffin-Lim vocoder with the same
  seed, timed, on models built once by torchaudio's own bundle getters from the installed
  directory (the server, too, has its model loaded before the request).

Random weights rarely end a sentence, so both run the decoder to torchaudio's 2000-step cap
(23 s of audio): the same work, checked by equal sample counts. It prints the median of the
per-round ratios modelhost/bare, and, separately, the seconds the full-size WaveRNN vocoder
(``TACOTRON2_WAVERNN_CHAR_LJSPEECH``'s) takes per second of audio: it generates sample by
sample, so it is the cost that decides whether that bundle is usable on a CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import wave
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fetch import BenchError  # noqa: E402
from fileserver import FileServer  # noqa: E402
from modelhost_server import start_modelhost  # noqa: E402

BUNDLE = "TACOTRON2_GRIFFINLIM_CHAR_LJSPEECH"
TEXT = "Every byte verified, every number measured."
SEED = 7


def build_weights(directory: Path) -> str:
    """The bundle's Tacotron2 with seeded random weights, under its real file name."""
    import torch
    import torchaudio
    from torchaudio.models import Tacotron2

    bundle = getattr(torchaudio.pipelines, BUNDLE)
    torch.manual_seed(0)
    name = bundle._tacotron2_path
    torch.save(Tacotron2(**bundle._tacotron2_params).state_dict(), directory / name)
    return name


def wav_samples(data: bytes) -> int:
    with wave.open(io.BytesIO(data)) as reader:
        return reader.getnframes()


def modelhost_synthesize(client: httpx.Client) -> tuple[float, int]:
    started = time.perf_counter()
    response = client.post("/synthesize", json={"model_name": "bench", "text": TEXT, "seed": SEED})
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise BenchError(f"synthesize failed: {response.text}")
    return seconds, wav_samples(response.content)


def load_bare(directory: Path):
    """torchaudio's own bundle getters on the installed directory (loaded once, untimed,
    as the server holds its model loaded)."""
    import torchaudio

    bundle = getattr(torchaudio.pipelines, BUNDLE)
    local = {"model_dir": str(directory), "weights_only": True, "progress": False}
    return bundle.get_tacotron2(dl_kwargs=local), bundle.get_vocoder(), bundle.get_text_processor()


def bare_synthesize(parts) -> tuple[float, int]:
    import torch

    tacotron2, vocoder, processor = parts
    started = time.perf_counter()
    tokens, lengths = processor(TEXT)
    with torch.inference_mode():
        torch.manual_seed(SEED)
        spectrogram, frames, _ = tacotron2.infer(tokens, lengths)
        waveform, _ = vocoder(spectrogram, frames)
    return time.perf_counter() - started, int(waveform.shape[-1])


def wavernn_seconds_per_audio_second(frames: int) -> float:
    """The full-size WaveRNN vocoder of TACOTRON2_WAVERNN_CHAR_LJSPEECH on ``frames`` frames."""
    import torch
    import torchaudio
    from torchaudio.models import WaveRNN
    from torchaudio.pipelines._tts.impl import _WaveRNNVocoder

    bundle = torchaudio.pipelines.TACOTRON2_WAVERNN_CHAR_LJSPEECH
    torch.manual_seed(0)
    vocoder = _WaveRNNVocoder(WaveRNN(**bundle._wavernn_params).eval())
    spectrogram = torch.randn(1, 80, frames) * 0.1 - 5
    with torch.inference_mode():
        started = time.perf_counter()
        waveform, _ = vocoder(spectrogram, torch.tensor([frames]))
        seconds = time.perf_counter() - started
    return seconds / (waveform.shape[-1] / vocoder.sample_rate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wavernn-frames", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="modelhost-tacotron2-"))
    (work / "mirror").mkdir()
    filename = build_weights(work / "mirror")
    runs = []
    with FileServer() as mirror:
        mirror.add(f"/audio/{filename}", work / "mirror" / filename)
        process, base = start_modelhost(
            {
                "MODELHOST_HOME": str(work / "home"),
                "MODELHOST_TORCHAUDIO_MIRROR": mirror.url("/audio"),
                "MODELHOST_DEVICE": "cpu",
            }
        )
        try:
            with httpx.Client(base_url=base, timeout=1800) as client:
                job = client.post(
                    "/models/download",
                    json={"source": "torchaudio", "model_id": BUNDLE, "name": "bench",
                          "allow_pickle": True},
                ).json()  # fmt: skip
                while True:
                    status = client.get(f"/models/download/status/{job['download_id']}").json()
                    if status["status"] in ("completed", "failed"):
                        break
                    time.sleep(0.1)
                if not status["message"].endswith("loaded on cpu"):
                    raise BenchError(f"install failed: {status['message']}")
                installed = Path(client.get("/models/download/bench/info").json()["path"])
                bare_parts = load_bare(installed)
                for number in range(args.rounds):
                    if number % 2 == 0:
                        ours, ours_samples = modelhost_synthesize(client)
                        bare, bare_samples = bare_synthesize(bare_parts)
                    else:
                        bare, bare_samples = bare_synthesize(bare_parts)
                        ours, ours_samples = modelhost_synthesize(client)
                    if ours_samples != bare_samples:
                        raise BenchError(f"different work: {ours_samples} vs {bare_samples}")
                    runs.append({"modelhost_s": ours, "bare_s": bare, "ratio": ours / bare,
                                 "samples": ours_samples})  # fmt: skip
                    if not args.json:
                        print(
                            f"round {number}: modelhost {ours:.2f} s, bare torchaudio "
                            f"{bare:.2f} s ({ours / bare:.3f}) for {ours_samples / 22050:.1f} s"
                        )
        finally:
            process.terminate()
            process.wait(timeout=30)
    wavernn = wavernn_seconds_per_audio_second(args.wavernn_frames)
    summary = {
        "bundle": BUNDLE,
        "runs": runs,
        "median_ratio": statistics.median(r["ratio"] for r in runs),
        "wavernn_frames": args.wavernn_frames,
        "wavernn_s_per_audio_s": wavernn,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"median modelhost/bare: {summary['median_ratio']:.3f}; full-size WaveRNN: "
            f"{wavernn:.1f} s of compute per second of audio"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
