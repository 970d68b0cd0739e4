"""The speed a multi-connection download reports is the rate the link carries, as the
server measures it (its request log's bytes sent over time)."""

from __future__ import annotations

import os
import statistics
import time

import pytest
from fileserver import FileServer, Rate

CONNECTIONS = 4
PER_CONNECTION = 2_000_000  # bytes/s: the server paces each connection (each part's GET)
SIZE = 32_000_000  # about 4 s at CONNECTIONS * PER_CONNECTION


def sent(server: FileServer) -> int:
    return sum(r.body_bytes_sent for r in server.requests if r.method == "GET")


@pytest.mark.serial  # compares rates over time
def test_reported_speed_of_a_multi_connection_download_is_what_the_server_sends(
    make_server, fileserver
):
    fileserver.add("/w.safetensors", os.urandom(SIZE), faults=[Rate(PER_CONNECTION)])
    server = make_server(
        [fileserver.host_port],
        fetch_connections=CONNECTIONS,
        fetch_part_threshold_mb=1,
        fetch_part_size_mb=4,
    )
    answer = server.client.post(
        "/models/download",
        json={
            "source": "url",
            "model_id": fileserver.url("/w.safetensors"),
            "name": "w",
            "load": False,
        },
    )
    assert answer.status_code == 202, answer.text
    job = answer.json()["download_id"]
    # (seconds since the POST, reported speed, bytes the server had sent)
    samples: list[tuple[float, int | None, int]] = []
    start = time.monotonic()
    while True:
        status = server.client.get(f"/models/download/status/{job}").json()
        samples.append((time.monotonic() - start, status["speed_bytes_per_s"], sent(fileserver)))
        if status["status"] != "downloading":
            break
        time.sleep(0.1)
    assert status["status"] == "completed", status["message"]

    # Mid-transfer, once every connection is on (the probe adds them in the first second)
    # and before the last parts end: the reported speed against the bytes the server sent
    # over the second before each sample.
    ratios = []
    for when, speed, bytes_sent in samples:
        if not 1.5 <= when <= samples[-1][0] - 1.0 or not speed:
            continue
        earlier = [s for s in samples if s[0] <= when - 1.0]
        then, _, sent_then = earlier[-1]
        ratios.append(speed / ((bytes_sent - sent_then) / (when - then)))
    assert len(ratios) >= 5, samples
    # A speed averaged from the start (the ramp-up included) showed about a third less.
    assert 0.9 <= statistics.median(ratios) <= 1.1, (ratios, samples)
