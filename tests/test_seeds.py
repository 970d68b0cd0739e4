"""Per-request seeds: the same seed gives the same audio while other requests, on this model
and on others, draw random numbers at the same time (torch's global generator untouched)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from tiny_models import build_vits

from modelhost.runtime.inference import synthesize
from modelhost.runtime.loaders import load
from modelhost.store.manifest import Manifest


@pytest.fixture(scope="module")
def two_vits(tmp_path_factory):
    path = build_vits(tmp_path_factory.mktemp("vits"))
    return [
        load(
            Manifest(name=n, source="huggingface", model_id="t/vits", task="text-to-speech"),
            path,
            torch.device("cpu"),
        )
        for n in ("vits-a", "vits-b")
    ]


def test_same_seed_same_audio_under_concurrency(two_vits):
    model, other = two_vits
    text = "reproducible speech, please"
    reference = synthesize(model, text, seed=1234).samples
    stop = threading.Event()

    def hammer_global_rng() -> None:  # another model's unseeded requests, and plain draws
        while not stop.is_set():
            synthesize(other, "noise from another model")
            torch.randn(64)

    results: list[np.ndarray] = []

    def seeded() -> None:
        for _ in range(3):
            results.append(synthesize(model, text, seed=1234).samples)

    hammers = [threading.Thread(target=hammer_global_rng) for _ in range(2)]
    callers = [threading.Thread(target=seeded) for _ in range(2)]
    for thread in hammers + callers:
        thread.start()
    for thread in callers:
        thread.join()
    stop.set()
    for thread in hammers:
        thread.join()
    assert len(results) == 6
    for samples in results:
        assert samples.shape == reference.shape
        assert np.array_equal(samples, reference)
    different = synthesize(model, text, seed=99).samples
    assert different.shape != reference.shape or not np.array_equal(different, reference)


def test_seeded_synthesis_leaves_the_global_generator_alone(two_vits):
    model, _ = two_vits
    torch.manual_seed(5)
    expected = torch.randn(4)
    torch.manual_seed(5)
    synthesize(model, "hello", seed=1)
    synthesize(model, "hello")
    assert torch.equal(torch.randn(4), expected)
