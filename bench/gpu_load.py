"""GPU load speed: a multi-GB safetensors model loaded onto CUDA through a modelhost server
(weights streamed: runtime/streamer.py) vs ``from_pretrained(path, device_map="cuda")``.

Run on a machine with a CUDA GPU, from the repository root (no internet needed)::

    PYTHONPATH=src:tests python bench/gpu_load.py                        # ~4.4 GB Llama-style
    PYTHONPATH=src:tests python bench/gpu_load.py --cold                 # page cache dropped
    PYTHONPATH=src:tests python bench/gpu_load.py --device cpu --size-gb 0.2   # a smoke run

It builds a Llama-style causal LM with random weights (bfloat16, ``--size-gb`` of weights,
saved with ``save_pretrained`` in ``--shard-gb`` shards, plus a byte-level tokenizer), runs
a modelhost server in this process (so this script reads the same CUDA allocator) with the
build directory as ``MODELHOST_IMPORT_ROOTS``, installs the model with the ``local`` source
(``load: false``), then for ``--rounds`` rounds, alternating which goes first:

- *modelhost*: ``POST /models/big/load`` with ``{"device": DEVICE}``, timed until it answers
  (the model is ready); ``allocated_mb`` from ``GET /models/managed`` is compared with the
  ``torch.cuda.memory_allocated()`` growth across the call; the server's log line says the
  weights were streamed (and at what rate the streamer alone moved them); a 2-token
  generation checks it serves; then ``POST /models/big/unload``;
- *from_pretrained*: ``AutoModelForCausalLM.from_pretrained(<the installed directory>,
  device_map=DEVICE, dtype="auto")`` timed until ``torch.cuda.synchronize()`` returns; then
  freed (``empty_cache``). ``device_map`` needs the ``accelerate`` package: without it the
  reference is ``from_pretrained(..., dtype="auto").to(DEVICE)`` and the JSON says so
  (``reference``);

Both read the same files (the installed model directory). Page cache: by default each
file is read once before every timed load (*warm*: both read from memory); with ``--cold``
each file's cached pages are dropped instead (``posix_fadvise(DONTNEED)``, no root needed),
so both read from the disk. A first untimed load of each warms imports and allocators.

Printed: per-round seconds and GB/s (weights bytes / seconds), the medians, the median of
the per-round time ratios modelhost_s / from_pretrained_s (below 1: modelhost is faster; the
convention of docs/performance.md), and one JSON object at the end. Targets: >= 10 GB/s
through the server, and a time ratio <= 0.5 (twice from_pretrained's speed).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

NAME = "big"
READ_CHUNK = 16 * 2**20
TARGET_GB_S = 10.0
TARGET_TIME_RATIO = 0.5  # modelhost's seconds / from_pretrained's: twice its speed


class BenchError(RuntimeError):
    """A step of the benchmark failed: the message says which."""


def llama_config(size_gb: float):
    """A Llama-style config whose bfloat16 weights take about ``size_gb`` GB."""
    from transformers import LlamaConfig

    params = size_gb * 1e9 / 2
    hidden, inter, vocab, heads, kv = (2048, 5632, 32000, 32, 4) if size_gb >= 1 else (
        512, 1408, 8000, 8, 2
    )  # fmt: skip
    head = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * head + 3 * hidden * inter + 2 * hidden
    layers = max(2, round((params - 2 * vocab * hidden) / per_layer))
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
        tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip


def build_model(directory: Path, size_gb: float, shard_gb: float, device: str) -> int:
    """Random bfloat16 weights of a Llama-style model (built on ``device``: on a GPU the
    random init takes no time) and a byte-level tokenizer; returns the weights' bytes."""
    from tiny_models import _byte_level_vocab
    from transformers import GPT2Tokenizer, LlamaForCausalLM

    config = llama_config(size_gb)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size=f"{int(shard_gb * 1000)}MB")
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    vocab = _byte_level_vocab(["<|endoftext|>"])
    GPT2Tokenizer(vocab=vocab, merges=[], model_max_length=2048).save_pretrained(directory)
    return weights_bytes(directory)


def weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def prepare_cache(directory: Path, cold: bool) -> None:
    """Warm: read every weights file once (both loaders then read from memory). Cold: drop
    the files' cached pages, so the next read comes from the disk."""
    for file in sorted(Path(directory).glob("*.safetensors")):
        fd = os.open(file.resolve(), os.O_RDONLY)
        try:
            if cold:  # the files are clean (written long before): their pages can go
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, READ_CHUNK):
                    pass
        finally:
            os.close(fd)


class StreamLog(logging.Handler):
    """Keeps the streamer's log lines (``modelhost.runtime.pretrained``): did it stream?"""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def serve(settings) -> tuple[uvicorn.Server, str]:
    from modelhost.api.app import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise BenchError("the modelhost server did not start")
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def install(client: httpx.Client, source: Path) -> Path:
    """The model installed with the local source (no load); returns its directory."""
    started = client.post(
        "/models/download",
        json={"source": "local", "model_id": str(source), "name": NAME, "load": False},
    )
    if started.status_code not in (200, 202):
        raise BenchError(f"install refused: {started.text}")
    job = started.json()["download_id"]
    deadline = time.monotonic() + 600
    while (status := client.get(f"/models/download/status/{job}").json())["status"] not in (
        "completed", "failed", "cancelled",
    ):  # fmt: skip
        if time.monotonic() > deadline:
            raise BenchError("install did not finish in 10 minutes")
        time.sleep(0.05)
    if status["status"] != "completed":
        raise BenchError(f"install {status['status']}: {status.get('message')}")
    return Path(client.get(f"/models/download/{NAME}/info").json()["path"])


def allocated(device: str) -> int:
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def modelhost_load(client: httpx.Client, device: str, log: StreamLog) -> dict:
    """One load through the server, checked and measured, then unloaded."""
    log.take()
    before = allocated(device)
    started = time.perf_counter()
    response = client.post(f"/models/{NAME}/load", json={"device": device})
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise BenchError(f"load failed ({response.status_code}): {response.text}")
    added = allocated(device) - before
    row = next(
        m for m in client.get("/models/managed").json()["downloaded_models"] if m["name"] == NAME
    )
    lines = log.take()
    streamed = [line for line in lines if " streamed " in line]
    predict = client.post(
        f"/models/{NAME}/predict",
        json={"inputs": "hello world", "parameters": {"max_new_tokens": 2}},
    )
    client.post(f"/models/{NAME}/unload")
    return {
        "seconds": seconds,
        "allocated_mb": row["memory_usage"]["allocated_mb"],
        "torch_allocated_delta_mb": round(added / 1e6, 3),
        "streamed": bool(streamed),
        "stream_log": streamed[0] if streamed else (lines[-1] if lines else None),
        "predict_status": predict.status_code,
    }


def has_accelerate() -> bool:
    """``device_map`` needs the accelerate package; without it the reference is
    ``from_pretrained(...).to(device)`` (modelhost's own path before streaming)."""
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def reference_name(device: str) -> str:
    if has_accelerate():
        return f'from_pretrained(path, device_map="{device}", dtype="auto")'
    return f'from_pretrained(path, dtype="auto").to("{device}") (accelerate not installed)'


def from_pretrained_load(directory: Path, device: str) -> float:
    """Seconds of the reference load (``reference_name``) until the device is done."""
    from transformers import AutoModelForCausalLM

    allocated(device)
    started = time.perf_counter()
    if has_accelerate():
        model = AutoModelForCausalLM.from_pretrained(
            directory, device_map=device, dtype="auto", local_files_only=True
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype="auto", local_files_only=True
        ).to(device)
    allocated(device)  # synchronizes
    seconds = time.perf_counter() - started
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return seconds


def raw_stream(directory: Path, device: str) -> float:
    """Seconds of the streamer alone (plan + read + copy), no model built."""
    from modelhost.runtime.streamer import plan_checkpoint, stream_files

    started = time.perf_counter()
    tensors, _ = stream_files(plan_checkpoint(directory), torch.device(device))
    allocated(device)
    seconds = time.perf_counter() - started
    del tensors
    if device == "cuda":
        torch.cuda.empty_cache()
    return seconds


def run_rounds(client, installed: Path, args, log: StreamLog, nbytes: int) -> list[dict]:
    """Alternating rounds of both loads (and the bare streamer), each after the same cache
    preparation."""
    rounds = []
    for number in range(args.rounds):
        order = ("modelhost", "from_pretrained") if number % 2 == 0 else (
            "from_pretrained", "modelhost"
        )  # fmt: skip
        result: dict = {"round": number, "order": list(order)}
        for which in order:
            prepare_cache(installed, args.cold)
            if which == "modelhost":
                result["modelhost"] = modelhost_load(client, args.device, log)
            else:
                result["from_pretrained_s"] = from_pretrained_load(installed, args.device)
        prepare_cache(installed, args.cold)
        result["raw_stream_s"] = raw_stream(installed, args.device)
        ours, theirs = result["modelhost"]["seconds"], result["from_pretrained_s"]
        result["time_ratio"] = ours / theirs
        print(
            f"round {number} ({' first, '.join(order)} second): modelhost {ours:.3f} s "
            f"({nbytes / ours / 1e9:.2f} GB/s), from_pretrained {theirs:.3f} s "
            f"({nbytes / theirs / 1e9:.2f} GB/s), time modelhost/from_pretrained "
            f"{ours / theirs:.2f}; streamer alone "
            f"{nbytes / result['raw_stream_s'] / 1e9:.2f} GB/s; allocated_mb "
            f"{result['modelhost']['allocated_mb']} vs torch delta "
            f"{result['modelhost']['torch_allocated_delta_mb']}",
            flush=True,
        )
        rounds.append(result)
    return rounds


def summarize(rounds: list[dict], nbytes: int, args, extra: dict) -> dict:
    ours = statistics.median(r["modelhost"]["seconds"] for r in rounds)
    theirs = statistics.median(r["from_pretrained_s"] for r in rounds)
    ratio = statistics.median(r["time_ratio"] for r in rounds)
    raw = statistics.median(r["raw_stream_s"] for r in rounds)
    mismatch = max(
        abs(r["modelhost"]["allocated_mb"] - r["modelhost"]["torch_allocated_delta_mb"])
        for r in rounds
    )
    summary = {
        **extra,
        "device": args.device,
        "reference": reference_name(args.device),
        "page_cache": "dropped before each load (posix_fadvise DONTNEED)"
        if args.cold
        else "warm: every file read once before each load",
        "weights_bytes": nbytes,
        "rounds": rounds,
        "modelhost_median_s": round(ours, 3),
        "modelhost_gb_per_s": round(nbytes / ours / 1e9, 2),
        "from_pretrained_median_s": round(theirs, 3),
        "from_pretrained_gb_per_s": round(nbytes / theirs / 1e9, 2),
        "median_time_ratio_modelhost_over_from_pretrained": round(ratio, 2),
        "raw_stream_gb_per_s": round(nbytes / raw / 1e9, 2),
        # CPU loads never stream (from_pretrained over memory-mapped files): null there.
        "all_streamed": all(r["modelhost"]["streamed"] for r in rounds)
        if args.device == "cuda"
        else None,
        "all_predict_200": all(r["modelhost"]["predict_status"] == 200 for r in rounds),
    }
    if args.device == "cuda":
        summary["allocated_mb_max_abs_diff"] = round(mismatch, 3)
        summary["allocated_mb_matches"] = mismatch <= 1.0
    else:  # on the CPU allocated_mb is the parameters' bytes (float32 there), no allocator
        summary["allocated_mb_matches"] = None
    if args.device == "cuda":
        summary["target_gb_per_s_met"] = summary["modelhost_gb_per_s"] >= TARGET_GB_S
        summary["target_ratio_met"] = ratio <= TARGET_TIME_RATIO
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--size-gb", type=float, default=4.4)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before loads")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("no CUDA GPU here: use --device cpu for a smoke run")

    from modelhost.config import Settings

    work = args.workdir or Path(tempfile.mkdtemp(prefix="modelhost-gpu-load-"))
    source = work / "imports" / "llama"
    t0 = time.perf_counter()
    nbytes = build_model(source, args.size_gb, args.shard_gb, args.device)
    extra = {
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "shards": len(list(source.glob("*.safetensors"))),
        "build_s": round(time.perf_counter() - t0, 2),
    }
    print(f"built {nbytes / 1e9:.2f} GB in {extra['shards']} files ({extra['build_s']} s)")
    log = StreamLog()
    logging.getLogger("modelhost.runtime.pretrained").addHandler(log)
    logging.getLogger("modelhost.runtime.pretrained").setLevel(logging.INFO)
    settings = Settings(
        home=work / "home",
        import_roots=(work / "imports",),
        device=args.device,
        url_allow_defaults=False,
        hf_hub_cache=work / "no-hf-cache",
    )
    server, base = serve(settings)
    try:
        with httpx.Client(base_url=base, timeout=600) as client:
            t0 = time.perf_counter()
            installed = install(client, source)
            extra["install_s"] = round(time.perf_counter() - t0, 2)
            modelhost_load(client, args.device, log)  # untimed warm-up of both paths
            from_pretrained_load(installed, args.device)
            rounds = run_rounds(client, installed, args, log, nbytes)
    finally:
        server.should_exit = True
    summary = summarize(rounds, nbytes, args, extra)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
