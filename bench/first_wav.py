"""From a finished ``pip install .`` to the first spoken WAV, as a new user meets it.

Run it from the repository root with a virtual environment where ``pip install .`` ran (a
plain install, no test extras) and this interpreter having the test extras (it builds the
model and serves the loopback Hub)::

    python3 -m venv /tmp/user-venv && /tmp/user-venv/bin/pip install .
    python bench/first_wav.py --venv /tmp/user-venv            # 3 rounds

Each round, with a fresh ``MODELHOST_HOME`` and ``HF_HOME``:

1. starts ``modelhost serve`` from that venv (the timer starts here);
2. runs ``modelhost run mms_tts_eng "Hello from modelhost."`` as soon as ``/health`` answers:
   the catalog name is resolved, ``facebook/mms-tts-eng`` is downloaded from the loopback
   Hub, verified, committed, loaded and asked to speak;
3. stops the timer when the command has exited 0 and ``mms_tts_eng.wav`` is a valid WAV.

The Hub serves a VITS model of facebook/mms-tts-eng's real architecture and size (the
transformers ``VitsConfig`` defaults are that model's configuration: 145 MB of float32
weights) with random weights, since the real files cannot be fetched here; the download,
verification, load and synthesis costs are those of the real model, the audio is noise.
Printed: each round's times (server answering, the run command, total) and their medians.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hubserver import HubServer  # noqa: E402

TEXT = "Hello from modelhost."


def build_mms_tts_eng(directory: Path) -> Path:
    """A VITS of facebook/mms-tts-eng's configuration (random weights) with a character
    tokenizer laid out as that repository's (vocab.json, no phonemizer)."""
    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "model.safetensors").is_file():
        return directory
    chars = list(" abcdefghijklmnopqrstuvwxyz'-.,!?")
    vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(chars)}, "<unk>": len(chars) + 1}
    (directory / "vocab.json").write_text(json.dumps(vocab), "utf-8")
    tokenizer = VitsTokenizer(
        vocab_file=str(directory / "vocab.json"),
        language="eng",
        add_blank=True,
        normalize=True,
        phonemize=False,
        is_uroman=False,
    )
    torch.manual_seed(0)
    config = VitsConfig(vocab_size=len(vocab), pad_token_id=0, sampling_rate=16_000)
    VitsModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _user_env(venv: Path, root: Path, hub: HubServer, port: int) -> dict[str, str]:
    path = [str(venv / "bin"), *os.environ.get("PATH", "").split(os.pathsep)]
    return {
        "PATH": os.pathsep.join(p for p in path if p != str(Path(sys.executable).parent)),
        "HOME": str(root),
        "MODELHOST_HOME": str(root / "home"),
        "MODELHOST_PORT": str(port),
        "MODELHOST_URL": f"http://127.0.0.1:{port}",
        "MODELHOST_URL_ALLOW": hub.host_port,
        "HF_ENDPOINT": hub.base_url,
        "HF_HOME": str(root / "hf"),
        "HF_HUB_DISABLE_XET": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }


def one_round(venv: Path, hub: HubServer) -> dict[str, float]:
    """Seconds from ``modelhost serve`` to /health, and to a verified WAV."""
    with tempfile.TemporaryDirectory(prefix="first-wav-") as tmp:
        root = Path(tmp)
        port = _free_port()
        env = _user_env(venv, root, hub, port)
        start = time.perf_counter()
        server = subprocess.Popen(
            ["modelhost", "serve"], env=env, cwd=root,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.05)
            healthy = time.perf_counter() - start
            done = subprocess.run(
                ["modelhost", "run", "mms_tts_eng", TEXT], env=env, cwd=root,
                capture_output=True, text=True, timeout=600,
            )
            total = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"modelhost run failed:\n{done.stdout}{done.stderr}")
            with wave.open(str(root / "mms_tts_eng.wav")) as wav:
                frames = wav.getnframes()
            if frames == 0:
                raise SystemExit("mms_tts_eng.wav has no frames")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    return {"serve_to_health_s": healthy, "run_s": total - healthy, "total_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, required=True, help="a venv with pip install .")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "first-wav")
    args = parser.parse_args()
    model = build_mms_tts_eng(args.workdir / "mms-tts-eng")
    size = sum(f.stat().st_size for f in model.iterdir())
    print(f"facebook/mms-tts-eng (random weights, real size): {size / 1e6:.1f} MB")
    rounds = []
    with HubServer() as hub:
        hub.add_repo("facebook/mms-tts-eng", model)
        for index in range(args.rounds):
            result = one_round(args.venv, hub)
            rounds.append(result)
            print(f"round {index + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print("median: " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))


if __name__ == "__main__":
    main()
