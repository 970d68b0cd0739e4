"""The safetensors streamer (runtime/streamer.py) and the streamed model build
(runtime/pretrained.py), on the CPU path of the same code; the CUDA tests run where a GPU is."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    WhisperForConditionalGeneration,
)

from modelhost.runtime import pretrained, streamer
from modelhost.runtime.errors import MalformedWeights
from modelhost.runtime.families.base import LoadOptions
from modelhost.runtime.pretrained import (
    load_pretrained,
    stream_enabled,
    stream_pretrained,
    stream_stats,
)
from modelhost.runtime.streamer import (
    StreamSettings,
    StreamUnsupported,
    plan_checkpoint,
    plan_file,
    stream_files,
)

CPU = torch.device("cpu")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (so NaN and -0.0 compare exactly)."""
    if tensor.is_floating_point():
        ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        return tensor.view(ints[tensor.element_size()])
    return tensor


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, expected in want.items():
        actual = got[key].cpu()
        assert actual.dtype == expected.dtype, key
        assert actual.shape == expected.shape, key
        assert torch.equal(bits(actual), bits(expected)), key


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every common dtype, a 0-d scalar, empty tensors, odd sizes that straddle chunks."""
    generator = torch.Generator().manual_seed(1)
    special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-40, 3.5])
    return {
        "f32": torch.randn(37, 5, generator=generator),
        "f32.special": special,
        "f16": torch.randn(3, 7, 11, generator=generator).half(),
        "bf16": torch.randn(129, generator=generator).bfloat16(),
        "f64": torch.randn(4, 4, generator=generator).double(),
        "i64": torch.arange(-50, 51, dtype=torch.int64),
        "i32": torch.randint(-(2**31), 2**31 - 1, (13,), generator=generator, dtype=torch.int32),
        "i8": torch.randint(-128, 127, (9,), generator=generator, dtype=torch.int8),
        "u8": torch.randint(0, 255, (17,), generator=generator, dtype=torch.uint8),
        "bool": torch.rand(23, generator=generator) > 0.5,
        "scalar": torch.tensor(2.5),
        "scalar.i64": torch.tensor(-7, dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "empty.bf16": torch.empty(4, 0, dtype=torch.bfloat16),
        "big": torch.randn(1000, generator=generator),
    }


@pytest.fixture
def mixed_file(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.safetensors"
    save_file(mixed_tensors(), path, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize(
    "chunk_bytes,threads,buffers",
    [(1, 1, 1), (7, 3, 2), (64, 2, 3), (4096, 4, 2), (16 * 2**20, 8, 2)],
)
def test_stream_equals_load_file_bit_for_bit(mixed_file, chunk_bytes, threads, buffers):
    plan = plan_file(mixed_file)
    settings = StreamSettings(chunk_bytes=chunk_bytes, threads=threads, buffers_per_thread=buffers)
    tensors, stats = stream_files([plan], CPU, settings)
    assert_same_tensors(tensors, load_file(mixed_file))
    data = mixed_file.stat().st_size - plan.data_start
    assert stats.bytes == data
    assert stats.chunks == -(-data // chunk_bytes)  # ceil: every chunk full but the last


def test_chunks_tile_each_file_and_straddle_tensors(mixed_file):
    plan = plan_file(mixed_file)
    chunks = streamer.plan_chunks([plan, plan], 100)
    for number in (0, 1):
        mine = [c for c in chunks if c.file == number]
        assert [c.begin for c in mine] == list(range(0, plan.data_size, 100))
        assert sum(c.length for c in mine) == plan.data_size
    big = plan.tensors["big"]
    assert (big.end - big.begin) == 4000 and big.begin // 100 != (big.end - 1) // 100


def test_only_empty_tensors_reads_nothing(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({"a": torch.empty(0), "b": torch.empty(2, 0, dtype=torch.int64)}, path)
    tensors, stats = stream_files([plan_file(path)], CPU, StreamSettings(chunk_bytes=3))
    assert_same_tensors(tensors, load_file(path))
    assert (stats.bytes, stats.chunks) == (0, 0)


def write_raw(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


@pytest.mark.parametrize(
    "name,make,message",
    [
        ("short", lambda p: p.write_bytes(b"\x01\x02"), "too short to be a safetensors file"),
        ("length", lambda p: write_raw(p, b"{}", length=10**6), "its header claims 1000000 bytes"),
        ("json", lambda p: write_raw(p, b"{not json"), "its header is not valid JSON"),
        (
            "truncated",
            lambda p: write_raw(
                p, json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})
                .encode(), b"\0" * 10,
            ),
            "ends at byte 16 of a 10-byte data section",
        ),
        (
            "dtype",
            lambda p: write_raw(
                p, json.dumps({"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}})
                .encode(), b"\0" * 4,
            ),
            "unknown dtype 'F33'",
        ),
    ],
)  # fmt: skip
def test_corrupt_header_is_a_clear_error_before_anything_is_allocated(
    tmp_path, monkeypatch, name, make, message
):
    model = tmp_path / "model"
    model.mkdir()
    make(model / "model.safetensors")
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    streams = []  # the step that allocates and reads: it must never be reached
    monkeypatch.setattr(pretrained, "Stream", lambda *a, **k: streams.append(a))
    with pytest.raises(MalformedWeights) as caught:
        stream_pretrained(AutoModelForCausalLM, model, CPU, torch.float32)
    assert message in str(caught.value)
    assert str(caught.value).startswith("model.safetensors is malformed")
    assert streams == []


def test_file_truncated_after_planning_fails_naming_it(mixed_file):
    plan = plan_file(mixed_file)
    os.truncate(mixed_file, mixed_file.stat().st_size - 100)
    with pytest.raises(MalformedWeights) as caught:
        stream_files([plan], CPU, StreamSettings(chunk_bytes=64, threads=3))
    text = str(caught.value)
    assert text.startswith(f"mixed.safetensors ended at byte {mixed_file.stat().st_size}")
    assert f"promises {plan.data_start + plan.data_size} bytes" in text


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_cancel_stops_the_readers_and_closes_the_files(mixed_file):
    before = open_descriptors()
    stream = streamer.Stream([plan_file(mixed_file)] * 3, CPU, StreamSettings(1, 2, 2))
    stream.cancel()
    assert stream.storage == {}
    assert not any(thread.is_alive() for thread in stream.threads)
    assert open_descriptors() == before
    with pytest.raises(streamer.StreamCancelled):
        stream.result()


def test_sub_byte_dtype_is_not_streamed(tmp_path):
    header = json.dumps({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    path = write_raw(tmp_path / "f4.safetensors", header, b"\0")
    with pytest.raises(StreamUnsupported, match="tensor 'w' is F4"):
        plan_file(path)


# --------------------------------------------------------------------------- models


def build_llama(directory: Path, shard: str | None = None, dtype=torch.bfloat16) -> Path:
    """A tiny Llama with tied embeddings (lm_head not stored) and rotary buffers."""
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(directory, max_shard_size=shard or "1GB")
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from tiny_models import build_bart, build_bert, build_whisper

    root = tmp_path_factory.mktemp("stream-models")
    return {
        "bert": build_bert(root / "bert"),
        "bart": build_bart(root / "bart"),
        "whisper": build_whisper(root / "whisper"),
        "llama": build_llama(root / "llama"),
        "llama-sharded": build_llama(root / "llama-sharded", shard="10KB"),
    }


CLASSES = {
    "bert": AutoModelForSequenceClassification,
    "bart": AutoModelForSeq2SeqLM,
    "whisper": WhisperForConditionalGeneration,
    "llama": AutoModelForCausalLM,
    "llama-sharded": AutoModelForCausalLM,
}


def assert_same_model(streamed: torch.nn.Module, loaded: torch.nn.Module) -> None:
    """Every parameter and buffer (non-persistent ones too) equal, same dtypes."""
    for kind in ("named_parameters", "named_buffers"):
        got = dict(getattr(streamed, kind)(remove_duplicate=False))
        want = dict(getattr(loaded, kind)(remove_duplicate=False))
        assert_same_tensors(got, want)
    assert not streamed.training


def model_inputs(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[2, 7, 9, 11, 3, 5]])
    if name == "whisper":
        features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
        start = model.config.decoder_start_token_id
        return {"input_features": features, "decoder_input_ids": torch.tensor([[start, 5]])}
    if name == "bart":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :3]}
    return {"input_ids": ids}


@pytest.mark.parametrize("name", list(CLASSES))
def test_streamed_model_equals_from_pretrained(models, name):
    cls, path = CLASSES[name], models[name]
    settings = StreamSettings(chunk_bytes=1000, threads=3)
    streamed = stream_pretrained(cls, path, CPU, torch.float32, settings)
    loaded = cls.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    assert type(streamed) is type(loaded)
    assert_same_model(streamed, loaded)
    with torch.no_grad():
        got = streamed(**model_inputs(name, streamed)).logits
        want = loaded(**model_inputs(name, loaded)).logits
    assert torch.equal(got, want)
    if loaded.can_generate():
        assert streamed.generation_config.to_dict() == loaded.generation_config.to_dict()
    stats = stream_stats(streamed)
    files = list(path.glob("*.safetensors"))
    assert stats.files == len(files)
    assert stats.bytes == sum(plan.data_size for plan in plan_checkpoint(path))


def test_tied_weights_are_one_tensor_and_bf16_streams_without_a_copy(models):
    path = models["llama-sharded"]
    assert len(list(path.glob("model-*.safetensors"))) >= 3  # really sharded
    streamed = stream_pretrained(AutoModelForCausalLM, path, CPU, "auto")
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype="auto", local_files_only=True)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    assert streamed.lm_head.weight.dtype == torch.bfloat16  # config.json's dtype
    assert_same_model(streamed, loaded)
    # The parameters are the streamed tensors themselves: each has its own storage.
    pointers = [p.data_ptr() for p in streamed.parameters()]
    assert len(set(pointers)) == len(pointers)


def test_sharded_index_must_match_the_shards(models, tmp_path):
    path = tmp_path / "llama"
    shutil.copytree(models["llama-sharded"], path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    shards = sorted(set(index["weight_map"].values()))
    wrong = next(s for s in shards if s != index["weight_map"][key])
    index["weight_map"][key] = wrong
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MalformedWeights, match=f"puts '{key}' in {wrong}"):
        plan_checkpoint(path)
    index["weight_map"][key] = "../elsewhere.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MalformedWeights, match="not a file beside it"):
        plan_checkpoint(path)


def test_sharded_stream_equals_each_shard(models):
    path = models["llama-sharded"]
    want = {}
    for shard in path.glob("model-*.safetensors"):
        want.update(load_file(shard))
    tensors, stats = stream_files(plan_checkpoint(path), CPU, StreamSettings(chunk_bytes=333))
    assert_same_tensors(tensors, want)
    assert stats.files == len(list(path.glob("model-*.safetensors")))


def test_a_checkpoint_needing_conversion_falls_back_with_a_log_line(models, tmp_path, caplog):
    path = tmp_path / "bert"
    shutil.copytree(models["bert"], path)
    tensors = load_file(path / "model.safetensors")
    key = next(k for k in tensors if k.endswith("LayerNorm.weight"))
    tensors[key.replace("weight", "gamma")] = tensors.pop(key)  # a legacy name
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StreamUnsupported, match="checkpoint keys the model does not have"):
        stream_pretrained(AutoModelForSequenceClassification, path, CPU, torch.float32)
    options = LoadOptions(CPU, safetensors=True, stream=True)
    with caplog.at_level(logging.INFO, logger="modelhost.runtime.pretrained"):
        model = load_pretrained(AutoModelForSequenceClassification, path, options)
    assert stream_stats(model) is None  # from_pretrained built it
    assert any("weights not streamed" in r.getMessage() for r in caplog.records)
    reference = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch.float32, local_files_only=True
    )
    assert_same_model(model.eval(), reference.eval())


def test_no_safetensors_falls_back(models, tmp_path, caplog):
    path = tmp_path / "bin"
    shutil.copytree(models["bert"], path)
    (path / "model.safetensors").unlink()
    with pytest.raises(StreamUnsupported, match="has no model.safetensors"):
        plan_checkpoint(path)


def test_missing_parameter_is_not_streamed(models, tmp_path):
    path = tmp_path / "bert"
    shutil.copytree(models["bert"], path)
    tensors = load_file(path / "model.safetensors")
    del tensors["classifier.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    before = open_descriptors()
    with pytest.raises(StreamUnsupported, match="parameters are not in the checkpoint"):
        stream_pretrained(AutoModelForSequenceClassification, path, CPU, torch.float32)
    assert open_descriptors() == before  # the stream started with the build was cancelled


def test_adapter_wiring_streams_when_asked(models):
    """The loaders' build path, with streaming forced on (it is CUDA-only in loaders.load)."""
    from modelhost.runtime.families import FamilyInfo
    from modelhost.runtime.loaders import _build

    config = json.loads((models["bert"] / "config.json").read_text())
    info = FamilyInfo(
        "text-classification", "text-classification", "bert", tuple(config["architectures"]),
        config,
    )  # fmt: skip
    parts = _build(info, models["bert"], CPU, True, stream=True)
    assert stream_stats(parts.model) is not None
    assert parts.extra["labels"] == {0: "NEGATIVE", 1: "POSITIVE"}
    plain = _build(info, models["bert"], CPU, True, stream=False)
    assert stream_stats(plain.model) is None
    assert_same_model(parts.model, plain.model)


def test_streaming_is_for_cuda_only_and_switchable(monkeypatch):
    from modelhost.config import Settings

    assert stream_enabled(torch.device("cuda", 0), True)
    assert not stream_enabled(torch.device("cuda", 0), False)
    assert not stream_enabled(CPU, True)
    assert Settings().gpu_stream is True
    monkeypatch.setenv("MODELHOST_GPU_STREAM", "false")
    assert Settings().gpu_stream is False


@pytest.mark.parametrize("setting", [True, False])
def test_the_setting_reaches_the_servers_loads(
    make_server, models, tmp_path, monkeypatch, setting
):
    """MODELHOST_GPU_STREAM decides, at each load the server runs, whether the weights stream
    (what the loader asks stream_enabled with): observed on a real load through the API, not
    read from the registry's private loader (fails if the setting is dropped on the way)."""
    from modelhost.runtime import loaders

    asked: list[bool] = []
    real = loaders.stream_enabled

    def recording(device, enabled: bool) -> bool:
        asked.append(enabled)
        return real(device, enabled)

    monkeypatch.setattr(loaders, "stream_enabled", recording)
    roots = tmp_path / "imports"
    shutil.copytree(models["bert"], roots / "bert")
    server = make_server([], import_roots=(roots,), gpu_stream=setting, device="cpu")
    started = server.client.post(
        "/models/download",
        json={"source": "local", "model_id": str(roots / "bert"), "name": "bert", "load": False},
    )
    assert server.wait_for(started.json()["download_id"], timeout=120)["status"] == "completed"
    assert server.client.post("/models/bert/load", json={}).status_code == 200
    assert asked == [setting]


# --------------------------------------------------------------------------- CUDA


@cuda_only
def test_cuda_stream_equals_load_file(mixed_file):
    device = torch.device("cuda", 0)
    tensors, _ = stream_files([plan_file(mixed_file)], device, StreamSettings(chunk_bytes=7))
    assert all(t.device == device for t in tensors.values())
    assert_same_tensors(tensors, load_file(mixed_file))


@cuda_only
def test_cuda_streamed_model_equals_from_pretrained(models):
    device = torch.device("cuda", 0)
    path = models["llama-sharded"]
    streamed = stream_pretrained(AutoModelForCausalLM, path, device, "auto")
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype="auto", local_files_only=True)
    assert all(p.device == device for p in streamed.parameters())
    assert all(b.device == device for b in streamed.buffers())
    assert_same_model(streamed, loaded.to(device))
    ids = torch.tensor([[2, 7, 9, 11]], device=device)
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=ids).logits, loaded(input_ids=ids).logits)


@cuda_only
def test_cuda_load_through_the_server_streams_and_measures(
    make_server, models, tmp_path, caplog
):
    roots = tmp_path / "imports"
    shutil.copytree(models["bert"], roots / "bert")
    server = make_server([], import_roots=(roots,))
    started = server.client.post(
        "/models/download",
        json={"source": "local", "model_id": str(roots / "bert"), "name": "bert", "load": False},
    )
    assert server.wait_for(started.json()["download_id"], timeout=120)["status"] == "completed"
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with caplog.at_level(logging.INFO, logger="modelhost.runtime.pretrained"):
        response = server.client.post("/models/bert/load", json={"device": "cuda"})
    assert response.status_code == 200, response.text
    assert any(": streamed 1 file(s)" in r.getMessage() for r in caplog.records)
    torch.cuda.synchronize()
    added = torch.cuda.memory_allocated() - before
    row = server.client.get("/models/managed").json()["downloaded_models"][0]
    assert row["device"] == "cuda:0"
    assert row["memory_usage"]["allocated_mb"] == round(added / 1e6, 3)
    prediction = server.client.post("/models/bert/predict", json={"inputs": "hello world"})
    assert prediction.status_code == 200, prediction.text
