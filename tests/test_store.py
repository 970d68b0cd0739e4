"""The content-addressed store: atomic commits, shared blobs, deletion, crash recovery."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from modelhost.errors import InvalidName, InvalidRequest, ModelNotFound
from modelhost.store import CommitFile, Manifest, Store


def stage(tmp_path: Path, name: str, data: bytes) -> CommitFile:
    """A verified file waiting in the partial directory, as the engine leaves it."""
    path = tmp_path / "partial" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return CommitFile(name, path, len(data), hashlib.sha256(data).hexdigest())


def manifest(name: str) -> Manifest:
    return Manifest(name=name, source="url", model_id=f"http://h/{name}", task="text-to-speech")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "home")


def test_commit_makes_a_loadable_directory(tmp_path, store):
    weights, config = os.urandom(4096), b'{"hidden": 32}'
    files = [stage(tmp_path, "model.safetensors", weights), stage(tmp_path, "config.json", config)]
    files.append(
        CommitFile(
            "sub/dir/vocab.txt",
            stage(tmp_path, "v", b"a\nb").local_path,
            3,
            hashlib.sha256(b"a\nb").hexdigest(),
        )
    )
    installed = store.commit(manifest("m1"), files)

    directory = store.model_path("m1")
    assert (directory / "model.safetensors").read_bytes() == weights
    assert (directory / "config.json").read_bytes() == config
    assert (directory / "sub/dir/vocab.txt").read_bytes() == b"a\nb"
    assert (directory / "config.json").is_symlink()
    assert {f.path for f in installed.files} == {
        "model.safetensors",
        "config.json",
        "sub/dir/vocab.txt",
    }
    assert installed.downloaded_at is not None and installed.total_size == 4096 + 14 + 3
    assert store.get("m1") == installed
    # The staged files moved into the blob store; nothing is left behind.
    assert not any((tmp_path / "partial").iterdir())
    assert store.verify("m1") == []


def test_shared_blob_is_stored_once_and_survives_one_delete(tmp_path, store):
    vocoder = os.urandom(10_000)
    store.commit(
        manifest("a"), [stage(tmp_path, "voc.bin", vocoder), stage(tmp_path, "a.bin", b"only a")]
    )
    store.commit(manifest("b"), [stage(tmp_path, "voc.bin", vocoder)])
    assert len(list(store.blobs_dir.iterdir())) == 2
    assert store.total_size() == 10_000 + 6

    removed, freed = store.delete("a")
    assert removed.name == "a"
    assert freed == 6  # the shared vocoder stays for b
    assert store.get("a") is None and not store.model_path("a").exists()
    assert (store.model_path("b") / "voc.bin").read_bytes() == vocoder

    _, freed = store.delete("b")
    assert freed == 10_000
    assert list(store.blobs_dir.iterdir()) == []


def test_delete_unknown_model(store):
    with pytest.raises(ModelNotFound, match="Model not found in cache: nope"):
        store.delete("nope")


@pytest.mark.parametrize(
    "bad", ["../etc/passwd", "/abs", "a/../../b", "", "a//b", "./a", "a\\b", ".tmp-x"]
)
def test_unsafe_file_paths_are_refused(tmp_path, store, bad):
    item = stage(tmp_path, "x", b"x")
    with pytest.raises(InvalidRequest):
        store.commit(manifest("m"), [CommitFile(bad, item.local_path, 1, item.sha256)])
    assert store.list() == []


@pytest.mark.parametrize("bad", ["../x", "", "a" * 300, "a/b", ".hidden", "x..y"])
def test_unsafe_model_names_are_refused(store, bad):
    with pytest.raises(InvalidName):
        store.get(bad)


def test_crash_leftovers_are_invisible_and_swept(tmp_path, store):
    store.commit(manifest("kept"), [stage(tmp_path, "k.bin", b"kept")])
    # What a crash mid-commit can leave: a staging directory, a renamed directory whose
    # manifest was never written, an orphan blob, a half-written manifest temp file.
    (store.models_dir / ".tmp-half.123").mkdir()
    (store.models_dir / "half").mkdir()
    orphan = store.blobs_dir / hashlib.sha256(b"orphan").hexdigest()
    orphan.write_bytes(b"orphan")
    (store.manifests_dir / ".tmp-half.json.1").write_text("{")
    assert [m.name for m in store.list()] == ["kept"]

    store.recover()
    assert sorted(p.name for p in store.models_dir.iterdir()) == ["kept"]
    assert not orphan.exists()
    assert list(store.manifests_dir.iterdir()) == [store.manifests_dir / "kept.json"]
    assert (store.model_path("kept") / "k.bin").read_bytes() == b"kept"


def test_recommit_replaces_atomically_and_collects_old_blobs(tmp_path, store):
    store.commit(manifest("m"), [stage(tmp_path, "w.bin", b"version 1")])
    store.commit(manifest("m"), [stage(tmp_path, "w.bin", b"version 2")])
    assert (store.model_path("m") / "w.bin").read_bytes() == b"version 2"
    assert [p.name for p in store.blobs_dir.iterdir()] == [hashlib.sha256(b"version 2").hexdigest()]


def test_verify_detects_damaged_blob(tmp_path, store):
    store.commit(manifest("m"), [stage(tmp_path, "w.bin", b"good bytes")])
    blob = store.blob_path(hashlib.sha256(b"good bytes").hexdigest())
    os.chmod(blob, 0o644)
    blob.write_bytes(b"bad bytes!")
    assert store.verify("m") == ["w.bin"]


def test_evict_least_recently_used(tmp_path, store):
    for index, name in enumerate(["old", "mid", "new"]):
        store.commit(manifest(name), [stage(tmp_path, f"{name}.bin", os.urandom(1000))])
        current = store.get(name)
        stamp = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(days=index)
        path = store.manifests_dir / f"{name}.json"
        path.write_text(current.model_copy(update={"last_used": stamp}).model_dump_json())
    evicted = store.evict_to_fit(limit_bytes=2000, keep={"new"})
    assert evicted == ["old"]
    assert [m.name for m in store.list()] == ["mid", "new"]
    assert store.evict_to_fit(limit_bytes=500, keep={"new"}) == ["mid"]
