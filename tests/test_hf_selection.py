"""Which files of a Hub repository get installed, and how an update is described."""

from __future__ import annotations

import dataclasses

import pytest
from huggingface_hub.hf_api import RepoFile

from modelhost.errors import InvalidRequest
from modelhost.fetch import FileSpec
from modelhost.jobs.manager import describe_changes
from modelhost.sources import Plan
from modelhost.sources.huggingface import check_repo_id, select_files, to_convert
from modelhost.store import Manifest, ManifestFile

REPO = [
    "config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "flax_model.msgpack",
    "onnx/model.onnx",
    "rust_model.ot",
    "tokenizer.json",
    "speaker_embeddings/en_speaker_0_semantic_prompt.npy",
]


def files(paths: list[str]) -> list[RepoFile]:
    return [RepoFile(type="file", path=p, size=1, oid="0" * 40) for p in paths]


def paths(selected: list[RepoFile]) -> list[str]:
    return [f.path for f in selected]


def test_safetensors_wins_over_every_other_copy():
    assert paths(select_files(files(REPO), None, None, allow_pickle=False)) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "speaker_embeddings/en_speaker_0_semantic_prompt.npy",
    ]


def test_only_pickled_weights_need_opt_in_under_policy_allow():
    repo = files(["config.json", "pytorch_model.bin", "tf_model.h5"])
    with pytest.raises(InvalidRequest, match="allow_pickle"):
        select_files(repo, None, None, allow_pickle=False, pickle_policy="allow")
    assert paths(select_files(repo, None, None, True, "allow")) == [
        "config.json",
        "pytorch_model.bin",
    ]


def test_pickled_state_dicts_are_selected_for_conversion_by_default():
    repo = files(["config.json", "pytorch_model.bin", "tf_model.h5"])
    assert paths(select_files(repo, None, None, allow_pickle=False)) == [
        "config.json",
        "pytorch_model.bin",
    ]
    # A .pkl is no state dict the converter takes: it still needs the opt-in.
    other = files(["config.json", "weights.pkl"])
    with pytest.raises(InvalidRequest, match="allow_pickle"):
        select_files(other, None, None, allow_pickle=False)


def test_policy_refuse_refuses_pickles_even_with_the_opt_in():
    repo = files(["config.json", "pytorch_model.bin"])
    with pytest.raises(InvalidRequest, match="MODELHOST_PICKLE_POLICY=refuse"):
        select_files(repo, None, None, allow_pickle=True, pickle_policy="refuse")


def test_patterns_override_the_defaults():
    repo = files(REPO)
    assert paths(select_files(repo, ["*.json"], None, allow_pickle=False)) == [
        "config.json",
        "pytorch_model.bin.index.json",
        "tokenizer.json",
    ]
    assert paths(select_files(repo, None, ["speaker_embeddings/*", "tok*"], False)) == [
        "config.json",
        "model.safetensors",
    ]
    assert paths(select_files(repo, ["onnx/*"], None, allow_pickle=False)) == ["onnx/model.onnx"]


def test_pickles_selected_beside_safetensors_are_never_converted_onto_them():
    """Converting pytorch_model.bin would write a second model.safetensors: by default the
    pickle is left out; opted in (allow_pickle) it is kept as it is, not converted."""
    repo = files(["config.json", "model.safetensors", "pytorch_model.bin", "vocoder/x.pt"])
    patterns = ["*.json", "*.safetensors", "*.bin"]
    assert paths(select_files(repo, patterns, None, allow_pickle=False)) == [
        "config.json",
        "model.safetensors",
    ]
    kept = select_files(repo, patterns, None, allow_pickle=True)
    assert paths(kept) == ["config.json", "model.safetensors", "pytorch_model.bin"]
    specs = [FileSpec(f"http://h/{f.path}", f.path) for f in repo]
    assert to_convert(specs, "convert", allow_pickle=True) == ["vocoder/x.pt"]


@pytest.mark.parametrize("bad", ["../x", "a/b/c", "", "a/..", "/abs", "a b"])
def test_repo_ids_are_validated(bad):
    with pytest.raises(InvalidRequest, match="Invalid model_id"):
        check_repo_id(bad)


def test_update_changes_are_compared_by_content():
    installed = Manifest(
        name="m",
        source="huggingface",
        model_id="org/m",
        revision="a" * 40,
        files=[
            ManifestFile(path="config.json", size=2, sha256="1" * 64, git_sha1="c" * 40),
            ManifestFile(path="model.safetensors", size=9, sha256="2" * 64),
            ManifestFile(path="old.txt", size=1, sha256="3" * 64, git_sha1="d" * 40),
        ],
    )
    plan = Plan(
        source="huggingface",
        model_id="org/m",
        task=None,
        revision="b" * 40,
        files=[
            FileSpec("u", "config.json", 2, git_sha1="c" * 40),
            FileSpec("u", "model.safetensors", 9, sha256="9" * 64),
            FileSpec("u", "new.txt", 1, git_sha1="e" * 40),
        ],
    )
    assert dataclasses.asdict(describe_changes(installed, plan)) == {
        "from_revision": "a" * 40,
        "to_revision": "b" * 40,
        "added": ["new.txt"],
        "modified": ["model.safetensors"],
        "removed": ["old.txt"],
        "unchanged": 1,
    }
