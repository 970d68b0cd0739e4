"""GPU check: a model of over 1 GB installed and loaded onto CUDA through the server.

Run on a machine with a CUDA GPU, from the repository root::

    PYTHONPATH=src:tests python bench/gpu_check.py            # ~1.3 GB BERT-large layout
    PYTHONPATH=src:tests python bench/gpu_check.py --device cpu --layers 2   # a dry run

It builds a random-weight BERT-large-sized classifier (safetensors, float32), serves it from
the Hub-compatible test server (``tests/hubserver.py``), runs a modelhost server in this
process (so this script can read the same CUDA allocator), installs the model with
``load: false``, then times ``POST /models/{name}/load`` and compares the ``allocated_mb``
that ``GET /models/managed`` reports with the ``torch.cuda.memory_allocated()`` delta around
the load. It then runs ``optimize`` and prints its measured latencies, and for reference
times a bare ``from_pretrained(...).to(device)`` of the same directory. One JSON object is
printed at the end.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn


def build_model(directory: Path, layers: int) -> int:
    """A BERT-large-shaped classifier with random weights; returns the weights' bytes."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=1024,
        num_hidden_layers=layers,
        num_attention_heads=16,
        intermediate_size=4096,
        num_labels=3,
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    # A one-word vocabulary file is enough for the tokenizer to load.
    (directory / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nworld\n")
    return (directory / "model.safetensors").stat().st_size


def serve(settings) -> tuple[uvicorn.Server, str]:
    from modelhost.api.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()

    from hubserver import HubServer

    from modelhost.config import Settings

    work = Path(tempfile.mkdtemp(prefix="modelhost-gpu-"))
    started = time.perf_counter()
    weight_bytes = build_model(work / "model", args.layers)
    result: dict = {
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "weights_bytes": weight_bytes,
        "build_s": round(time.perf_counter() - started, 2),
    }
    with HubServer() as hub:
        hub.add_repo("bench-org/bert-large-random", work / "model")
        settings = Settings(
            home=work / "home",
            hf_endpoint=hub.base_url,
            hf_hub_cache=work / "no-cache",
            device=args.device,
            url_allow_defaults=False,
        )
        server, base = serve(settings)
        client = httpx.Client(base_url=base, timeout=600)
        t0 = time.perf_counter()
        job = client.post(
            "/models/download",
            json={
                "source": "huggingface",
                "model_id": "bench-org/bert-large-random",
                "name": "big",
                "task": "text-classification",
                "load": False,
            },
        ).json()
        while (status := client.get(f"/models/download/status/{job['download_id']}").json())[
            "status"
        ] not in ("completed", "failed"):
            time.sleep(0.05)
        result["install_s"] = round(time.perf_counter() - t0, 3)
        result["install_status"] = status["status"]

        if args.device == "cuda":
            torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() if args.device == "cuda" else 0
        t0 = time.perf_counter()
        loaded = client.post("/models/big/load", json={"device": args.device})
        load_s = time.perf_counter() - t0
        after = torch.cuda.memory_allocated() if args.device == "cuda" else 0
        row = client.get("/models/managed").json()["downloaded_models"][0]
        result.update(
            load_status=loaded.status_code,
            load_s=round(load_s, 3),
            load_gb_per_s=round(weight_bytes / load_s / 1e9, 3),
            managed_allocated_mb=row["memory_usage"]["allocated_mb"],
            torch_allocated_delta_mb=round((after - before) / 2**20, 3),
            parameters=row["parameters"],
        )
        optimize = client.post(
            "/models/manage", params={"action": "optimize", "model_name": "big"}
        ).json()
        result["optimize"] = {
            k: optimize.get(k)
            for k in (
                "applied",
                "technique",
                "latency_ms_before",
                "latency_ms_after",
                "memory_mb_before",
                "memory_mb_after",
                "max_abs_diff",
                "message",
            )
        }
        prediction = client.post("/models/big/predict", json={"inputs": "hello world"})
        result["predict_status"] = prediction.status_code
        client.post("/models/big/unload")
        server.should_exit = True

    from transformers import BertForSequenceClassification

    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    bare = BertForSequenceClassification.from_pretrained(work / "model").to(args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    result["bare_from_pretrained_s"] = round(time.perf_counter() - t0, 3)
    result["load_vs_bare"] = round(result["load_s"] / result["bare_from_pretrained_s"], 3)
    del bare
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
