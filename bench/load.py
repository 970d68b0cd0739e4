"""Model load time through the server vs a bare ``from_pretrained``, and the memory it adds.

Run it from the repository root, with the package and its test extras installed::

    python bench/load.py                  # BERT-base-sized classifier (~440 MB), 5 rounds
    python bench/load.py --layers 4 --rounds 3

It builds a random-weight BERT-base-shaped classifier (safetensors, float32), serves it
from the Hub-compatible test server (``tests/hubserver.py``) and installs it into a
modelhost server subprocess with ``load: false``. Each round, alternating the order:

- *modelhost*: ``POST /models/{name}/load`` timed until it answers (the model is ready);
  then ``POST /models/{name}/unload``.
- *bare*: a fresh Python process runs ``AutoModelForSequenceClassification.from_pretrained``
  on the same directory twice and times each call (imports excluded): the first (*cold*)
  pays transformers' one-time set-up, the second (*warm*) is like for like with a server
  that has loaded a model before. The headline ratio is against the warm call.

Memory: before each modelhost load the server's peak RSS is reset (``/proc/PID/clear_refs``)
and read after (``VmHWM``); the peak added by loading is compared with the weights' bytes.
It prints the median of the per-round time ratios modelhost/bare (target <= 1.05) and the
largest peak-RSS ratio (target <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fetch import BenchError  # noqa: E402
from hubserver import HubServer  # noqa: E402
from modelhost_server import start_modelhost  # noqa: E402

BARE = """
import json, sys, time
from transformers import AutoModelForSequenceClassification
times = []
for _ in range(2):
    t = time.perf_counter()
    AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
    times.append(time.perf_counter() - t)
print(json.dumps({"cold": times[0], "warm": times[1]}))
"""


def build_model(directory: Path, layers: int) -> int:
    """A BERT-base-shaped classifier with random weights; returns the weights' bytes."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=layers, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(directory)
    (directory / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    return (directory / "model.safetensors").stat().st_size


def rss_field(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no {field} for process {pid}")


def modelhost_load(client: httpx.Client, pid: int) -> tuple[float, int, int]:
    """Seconds until the load answers; the peak RSS added by the load, and by the load plus
    a first prediction (weights are memory-mapped and paged in when first used)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = rss_field(pid, "VmRSS")
    started = time.perf_counter()
    response = client.post("/models/bench/load", json={"device": "cpu"})
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise BenchError(f"load failed: {response.text}")
    after_load = rss_field(pid, "VmHWM")
    if client.post("/models/bench/predict", json={"inputs": "hello"}).status_code != 200:
        raise BenchError("prediction failed")
    after_use = rss_field(pid, "VmHWM")
    client.post("/models/bench/unload")
    return seconds, after_load - before, after_use - before


def bare_load(directory: Path) -> dict[str, float]:
    """from_pretrained timed in a fresh process: its first call, and a second one."""
    output = subprocess.run(
        [sys.executable, "-c", BARE, str(directory)], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="modelhost-load-"))
    weights = build_model(work / "model", args.layers)
    runs = []
    with HubServer() as hub:
        hub.add_repo("bench-org/bert-base-random", work / "model")
        home = work / "home"
        process, base = start_modelhost(
            {
                "MODELHOST_HOME": str(home),
                "HF_ENDPOINT": hub.base_url,
                "HF_HUB_CACHE": str(home / "no-hf-cache"),
                "MODELHOST_DEVICE": "cpu",
            }
        )
        try:
            with httpx.Client(base_url=base, timeout=600) as client:
                job = client.post(
                    "/models/download",
                    json={
                        "source": "huggingface",
                        "model_id": "bench-org/bert-base-random",
                        "name": "bench",
                        "task": "text-classification",
                        "load": False,
                    },
                ).json()
                while (
                    client.get(f"/models/download/status/{job['download_id']}").json()["status"]
                    != "completed"
                ):
                    time.sleep(0.05)
                installed = Path(client.get("/models/download/bench/info").json()["path"])
                modelhost_load(client, process.pid)  # warm: first-load imports, page cache
                bare_load(installed)
                for number in range(args.rounds):
                    if number % 2 == 0:
                        ours, added, used = modelhost_load(client, process.pid)
                        bare = bare_load(installed)
                    else:
                        bare = bare_load(installed)
                        ours, added, used = modelhost_load(client, process.pid)
                    runs.append(
                        {
                            "modelhost_s": ours,
                            "bare_cold_s": bare["cold"],
                            "bare_warm_s": bare["warm"],
                            "ratio": ours / bare["warm"],
                            "ratio_vs_cold": ours / bare["cold"],
                            "peak_rss_added": added,
                            "rss_ratio": added / weights,
                            "peak_rss_added_after_use": used,
                            "rss_ratio_after_use": used / weights,
                        }
                    )
                    if not args.json:
                        print(
                            f"round {number}: modelhost {ours:.3f} s; bare from_pretrained "
                            f"{bare['warm']:.3f} s warm, {bare['cold']:.3f} s cold (ratios "
                            f"{ours / bare['warm']:.2f}, {ours / bare['cold']:.2f}); peak RSS "
                            f"added {added / weights:.2f} x weights by the load, "
                            f"{used / weights:.2f} x with a first prediction"
                        )
        finally:
            process.terminate()
            process.wait(timeout=30)
    summary = {
        "weights_bytes": weights,
        "runs": runs,
        "median_ratio": statistics.median(r["ratio"] for r in runs),
        "median_ratio_vs_cold": statistics.median(r["ratio_vs_cold"] for r in runs),
        "max_rss_ratio": max(r["rss_ratio"] for r in runs),
        "max_rss_ratio_after_use": max(r["rss_ratio_after_use"] for r in runs),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"weights: {weights / 1e6:.1f} MB")
        print(
            f"load time modelhost / bare warm from_pretrained (median of {len(runs)} rounds): "
            f"{summary['median_ratio']:.3f}; / bare cold: {summary['median_ratio_vs_cold']:.3f}"
        )
        print(
            f"peak RSS added / weights (worst round): load {summary['max_rss_ratio']:.2f}, "
            f"load + first prediction {summary['max_rss_ratio_after_use']:.2f}"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
