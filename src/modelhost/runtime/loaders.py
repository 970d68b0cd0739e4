"""Loading an installed model: one loader per family, measured memory, pickle policy.

Every loader reads only local files (``local_files_only``), never runs repository code
(no ``trust_remote_code``), and reads safetensors unless the caller opted in to pickled
weights, which Transformers then reads with ``torch.load(weights_only=True)``. Models load
in float32 on CPU and MPS and in their stored dtype on CUDA.
"""

from __future__ import annotations

import logging
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError

from modelhost.errors import ModelhostError
from modelhost.runtime.device import device_str
from modelhost.runtime.errors import (
    MalformedWeights,
    MemoryBudgetExceeded,
    PickleRefused,
    UnsupportedModel,
)
from modelhost.runtime.families import FamilyInfo, detect_family
from modelhost.runtime.families.base import LoadOptions, Parts
from modelhost.runtime.families.registry import adapter_for
from modelhost.runtime.images import ConfigPreprocessor
from modelhost.runtime.loaded import LoadedModel
from modelhost.runtime.memory import (
    count_parameters,
    read_allocator,
    release_cached,
    weights_bytes,
)
from modelhost.runtime.speaker import default_speaker_embedding
from modelhost.store.manifest import Manifest

log = logging.getLogger(__name__)


def _hf_kwargs(device: torch.device, safetensors: bool) -> dict[str, Any]:
    return {
        "local_files_only": True,
        # Pickles were allowed (check_pickle): each folder then takes safetensors where it
        # has them and its .bin otherwise (a bundle may mix the two).
        "use_safetensors": True if safetensors else None,
        "dtype": "auto" if device.type == "cuda" else torch.float32,
    }


def _text_classification(info: FamilyInfo, path: Path, kw: dict[str, Any]) -> Parts:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    labels = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    return Parts(model, tokenizer, extra={"labels": labels})


def _feature_extraction(info: FamilyInfo, path: Path, kw: dict[str, Any]) -> Parts:
    if info.sentence_transformers:
        from sentence_transformers import SentenceTransformer

        model_kwargs = {"dtype": kw["dtype"], "use_safetensors": kw["use_safetensors"]}
        model = SentenceTransformer(
            str(path), device="cpu", local_files_only=True, model_kwargs=model_kwargs
        )
        return Parts(model, None, extra={"backend": "sentence-transformers"})
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return Parts(model, tokenizer, extra={"backend": "transformers-mean-pooling"})


def _text_generation(info: FamilyInfo, path: Path, kw: dict[str, Any]) -> Parts:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    return Parts(model, AutoTokenizer.from_pretrained(path, local_files_only=True))


def _text2text(info: FamilyInfo, path: Path, kw: dict[str, Any]) -> Parts:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(path, **kw)
    return Parts(model, AutoTokenizer.from_pretrained(path, local_files_only=True))


def _whisper(info: FamilyInfo, path: Path, kw: dict[str, Any]) -> Parts:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(path, **kw)
    processor = WhisperProcessor.from_pretrained(path, local_files_only=True)
    rate = int(processor.feature_extractor.sampling_rate)
    return Parts(model, processor, extra={"input_sample_rate": rate})


def _image_classification(info: FamilyInfo, path: Path, kw: dict[str, Any]) -> Parts:
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(path, **kw)
    processor: Any
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        kind = "transformers"
    except (ImportError, OSError, ValueError) as exc:
        # Transformers' image processors need Pillow or torchvision.
        log.info("image processor of %s unavailable (%s); using its config", path, exc)
        image_size = getattr(model.config, "image_size", None)
        processor = ConfigPreprocessor.from_model_dir(path, image_size)
        kind = "config"
    labels = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    return Parts(model, processor, extra={"labels": labels, "image_processor": kind})


def _speecht5(info: FamilyInfo, path: Path, kw: dict[str, Any]) -> Parts:
    from transformers import SpeechT5ForTextToSpeech, SpeechT5HifiGan, SpeechT5Processor

    assert info.vocoder_path is not None  # detect_family guarantees it
    model = SpeechT5ForTextToSpeech.from_pretrained(path, **kw)
    processor = SpeechT5Processor.from_pretrained(path, local_files_only=True)
    vocoder = SpeechT5HifiGan.from_pretrained(info.vocoder_path, **kw)
    dim = int(model.config.speaker_embedding_dim)
    return Parts(
        model,
        processor,
        vocoder=vocoder,
        sample_rate=int(vocoder.config.sampling_rate),
        extra={
            "speaker_embedding_dim": dim,
            "default_speaker": default_speaker_embedding(dim),
            "max_text_positions": int(model.config.max_text_positions),
        },
    )


def _bark(info: FamilyInfo, path: Path, kw: dict[str, Any]) -> Parts:
    from transformers import BarkModel, BarkProcessor

    model = BarkModel.from_pretrained(path, **kw)
    presets_file = "speaker_embeddings_path.json"
    processor = BarkProcessor.from_pretrained(
        path,
        speaker_embeddings_dict_path=presets_file if (path / presets_file).is_file() else None,
        local_files_only=True,
    )
    presets = sorted(processor.available_voice_presets) if processor.speaker_embeddings else []
    rate = getattr(model.generation_config, "sample_rate", None)
    if rate is None:  # the codec's own rate, when generation_config.json did not record it
        rate = model.config.codec_config.sampling_rate
    return Parts(model, processor, sample_rate=int(rate), extra={"voice_presets": presets})


def _vits(info: FamilyInfo, path: Path, kw: dict[str, Any]) -> Parts:
    from transformers import AutoTokenizer, VitsModel

    model = VitsModel.from_pretrained(path, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if getattr(tokenizer, "is_uroman", False):
        raise UnsupportedModel(
            f"{path.name}: this VITS tokenizer needs text romanised with uroman first, "
            "which the server does not do yet"
        )
    speakers = int(getattr(model.config, "num_speakers", 1) or 1)
    return Parts(
        model,
        tokenizer,
        sample_rate=int(model.config.sampling_rate),
        extra={"num_speakers": speakers},
    )


def _torchscript(info: FamilyInfo, path: Path, kwargs: dict[str, Any]) -> Parts:
    """A TorchScript archive: compiled TorchScript code and tensors, no Python pickles run."""
    archives = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth", ".ptl"))
    if len(archives) != 1:
        raise UnsupportedModel(
            f"A TorchScript model is one .pt/.pth/.ptl file; found {len(archives)} in {path}"
        )
    try:
        module = torch.jit.load(str(archives[0]), map_location="cpu")
    except RuntimeError as exc:
        raise UnsupportedModel(f"{archives[0].name} is not a TorchScript archive: {exc}") from exc
    return Parts(model=module)


def _torchvision(info: FamilyInfo, path: Path, kwargs: dict[str, Any]) -> Parts:
    """A torchvision architecture built by name, then the state dict loaded strictly into it.

    Labels and preprocessing come from the architecture's default weights enum (metadata in
    torchvision's code, nothing downloaded)."""
    try:
        import torchvision
    except ImportError as exc:
        raise UnsupportedModel(
            "torchvision is not installed: pip install 'modelhost[vision]'"
        ) from exc
    name = str(info.model_type)
    if name not in torchvision.models.list_models():
        raise UnsupportedModel(f"torchvision has no architecture {name!r}")
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt"))
    if len(files) != 1:
        raise UnsupportedModel(f"expected one weights file in {path}, found {len(files)}")
    if files[0].suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(files[0]))
    else:  # pickled: only reached with allow_pickle (check_pickle), and never runs code
        state = torch.load(files[0], map_location="cpu", weights_only=True)
    model = torchvision.models.get_model(name, weights=None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UnsupportedModel(
            f"{files[0].name} does not fit torchvision's {name}: {str(exc).splitlines()[0]}"
        ) from exc
    enum = torchvision.models.get_model_weights(name)
    member = info.config.get("weights")
    weights = enum[member] if member in enum.__members__ else enum.DEFAULT
    return Parts(
        model=model,
        processor=weights.transforms(),
        extra={"categories": list(weights.meta.get("categories") or [])},
    )


def _torch_hub(info: FamilyInfo, path: Path, kwargs: dict[str, Any]) -> Parts:
    """``torch.hub.load`` of an installed repository snapshot (its hubconf.py runs: the
    pytorch_hub source admits only allow-listed repositories pinned to a ref)."""
    if not (path / "hubconf.py").is_file():
        raise UnsupportedModel(f"{path} has no hubconf.py")
    try:
        module = torch.hub.load(str(path), str(info.model_type), source="local")
    except Exception as exc:  # the repository's own code: report what it raised
        raise UnsupportedModel(
            f"torch.hub.load of entrypoint {info.model_type!r} failed: {exc!r}"
        ) from exc
    if not isinstance(module, torch.nn.Module):
        raise UnsupportedModel(f"entrypoint {info.model_type!r} returned no torch.nn.Module")
    return Parts(model=module)


def _tacotron2(info: FamilyInfo, path: Path, kwargs: dict[str, Any]) -> Parts:
    """A torchaudio Tacotron2 bundle built by torchaudio from the installed weight files.

    torchaudio's own getters build the models; their ``load_state_dict_from_url`` finds each
    file already in ``path`` (checked first, so it never downloads) and reads it with
    ``weights_only=True``."""
    try:
        from torchaudio import pipelines
    except ImportError as exc:
        raise UnsupportedModel(
            "torchaudio is not installed: pip install 'modelhost[audio]'"
        ) from exc
    name = str(info.model_type)
    bundle = getattr(pipelines, name, None)
    if not isinstance(bundle, pipelines.Tacotron2TTSBundle):
        raise UnsupportedModel(f"this torchaudio has no text-to-speech bundle {name!r}")
    # The files torchaudio's getters will look for (the torchaudio source fetched these).
    wanted = [getattr(bundle, a, None) for a in ("_tacotron2_path", "_wavernn_path")]
    converted = [f for f in wanted if f and _converted(path, f).is_file()]
    if converted and len(converted) == len([f for f in wanted if f]):
        tacotron2, vocoder = _tacotron2_from_safetensors(bundle, path, wanted)
    else:
        missing = [f for f in wanted if f and not (path / f).is_file()]
        if missing:
            raise UnsupportedModel(f"{path} lacks the bundle's weight files: {', '.join(missing)}")
        local = {"model_dir": str(path), "weights_only": True, "progress": False}
        tacotron2 = bundle.get_tacotron2(dl_kwargs=local)
        vocoder = bundle.get_vocoder(dl_kwargs=local)
    return Parts(
        model=tacotron2,
        processor=bundle.get_text_processor(),
        vocoder=vocoder,
        sample_rate=int(vocoder.sample_rate),
        extra={"bundle": name, "vocoder": type(vocoder).__name__.strip("_")},
    )


def _converted(path: Path, name: str) -> Path:
    """Where the pickle policy ``convert`` put ``name``'s tensors (same stem, .safetensors)."""
    return path / (Path(name).stem + ".safetensors")


def _tacotron2_from_safetensors(bundle: Any, path: Path, wanted: list[str | None]) -> tuple:
    """The bundle's models built as its getters build them (same classes and parameters),
    with the converted safetensors weights instead of torchaudio's pickles."""
    from safetensors.torch import load_file
    from torchaudio.models import Tacotron2, WaveRNN
    from torchaudio.pipelines._tts import impl

    tacotron2 = Tacotron2(**bundle._tacotron2_params)
    tacotron2.load_state_dict(load_file(str(_converted(path, str(wanted[0])))))
    tacotron2.eval()
    if wanted[1] is None:  # Griffin-Lim: an algorithm, no weights
        return tacotron2, bundle.get_vocoder()
    wavernn = WaveRNN(**bundle._wavernn_params)
    wavernn.load_state_dict(load_file(str(_converted(path, wanted[1]))))
    return tacotron2, impl._WaveRNNVocoder(wavernn.eval())


def _weights_only_refusal(exc: BaseException) -> str | None:
    """What torch's restricted unpickler refused, when ``exc`` (or its cause) is that."""
    while exc is not None:
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            return f"it tries to use {found.group(1)}" if found else " ".join(text.split())[:300]
        exc = exc.__cause__ or exc.__context__
    return None


# More layers than any real model has: building that many modules, even on the meta
# device, would take the server's time and memory before the budget could refuse it.
MAX_CONFIG_LAYERS = 10_000
_LAYER_KEYS = ("layers", "n_layer", "num_blocks")


@dataclass(frozen=True)
class Preflight:
    """What ``preflight`` checked and found, before anything is allocated."""

    info: FamilyInfo
    safetensors: bool  # no pickled weights are read
    weights_bytes: int  # what the stored weights take loaded (``estimate_bytes``)
    config_bytes: int = 0  # what config.json's architecture takes loaded (0: not sized)
    config_parameters: int = 0

    @property
    def need_bytes(self) -> int:
        """The larger of the two estimates: a config can declare far more than its files."""
        return max(self.weights_bytes, self.config_bytes)


def preflight(
    manifest: Manifest,
    path: Path,
    device_type: str,
    allow_pickle: bool = False,
    from_config: bool = True,
) -> Preflight:
    """Every check a load makes before it allocates: the family, the pickle policy, pickled
    files through ``weights_only``, each safetensors header, and (``from_config``) the
    architecture config.json declares, sized on the meta device. Raises a 4xx error naming
    the file at fault."""
    path = Path(path)
    info = detect_family(manifest, path)
    adapter = adapter_for(info.family)
    safetensors = adapter.check_weights(manifest, path, allow_pickle)
    weights = adapter.estimate_bytes(info, manifest, path, device_type)
    if not from_config:
        return Preflight(info, safetensors, weights)
    parameters, nbytes = adapter.config_size(info, path, device_type)
    return Preflight(info, safetensors, weights, nbytes, parameters)


def _config_error(path: Path, what: object) -> MalformedWeights:
    return MalformedWeights(
        f"{path.name}/config.json is not a valid model config: {what}. Reinstall the model, "
        "or fix its config.json"
    )


def _check_layer_counts(values: Any, path: Path) -> None:
    """Refuse a config (or nested sub-config) declaring an absurd number of layers."""
    if isinstance(values, dict):
        for key, value in values.items():
            if (
                isinstance(value, int)
                and any(k in str(key) for k in _LAYER_KEYS)
                and value > MAX_CONFIG_LAYERS
            ):
                raise _config_error(path, f"{key} is {value}, over {MAX_CONFIG_LAYERS}")
            _check_layer_counts(value, path)


def config_size(path: Path, device_type: str, class_name: str) -> tuple[int, int]:
    """Parameters and loaded bytes of the architecture ``path``/config.json declares: the
    model class built on the meta device (no memory), its parameters priced as the loaders
    load them (float32 off CUDA, the config's dtype on CUDA)."""
    import transformers

    cls = getattr(transformers, class_name)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # parsing only, no model code runs: any failure is the file's
        raise _config_error(path, _first_line(exc)) from None
    _check_layer_counts(config.to_dict(), path)
    try:
        with torch.device("meta"):
            build = cls.from_config if cls.__name__.startswith("Auto") else cls._from_config
            model = build(config)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError,
            OverflowError, AssertionError) as exc:  # fmt: skip
        raise _config_error(path, f"{cls.__name__} cannot be built from it ({exc})") from None
    except Exception as exc:  # the architecture's code; not sizing it is safe, loading checks
        log.warning("could not size %s from its config on meta: %r", path, exc)
        return 0, 0
    stored = getattr(config, "dtype", None)  # transformers maps a saved torch_dtype here
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    float_size = (
        torch.empty((), dtype=stored).element_size()
        if (device_type == "cuda" and isinstance(stored, torch.dtype))
        else 4
    )
    parameters = nbytes = 0
    for tensor in model.parameters():  # shared (tied) parameters are yielded once
        parameters += tensor.numel()
        size = float_size if tensor.is_floating_point() else tensor.element_size()
        nbytes += tensor.numel() * size
    return parameters, nbytes


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _build(info: FamilyInfo, path: Path, device: torch.device, safetensors: bool) -> Parts:
    """The family loader's parts moved to ``device``. Whatever Transformers or torch raise
    about the model's own files becomes a 400 naming the model; running out of memory a
    409; either way nothing stays allocated."""
    try:
        adapter = adapter_for(info.family)
        parts = adapter.load(info, path, LoadOptions(device, safetensors))
        parts.model.eval().to(device)
        if parts.vocoder is not None:
            parts.vocoder.eval().to(device)
        return parts
    except ModelhostError:
        raise
    except Exception as exc:
        release_cached(device)
        raise _load_error(exc, path, device) from None


def _load_error(exc: Exception, path: Path, device: torch.device) -> Exception:
    """The 4xx error a failed family loader's exception stands for (or ``exc`` itself, a bug)."""
    refusal = _weights_only_refusal(exc)
    if refusal is not None:  # a pickle the pre-check did not see (e.g. a component's)
        return PickleRefused(
            f"A pickled weights file in {path.name} was refused by "
            f"torch.load(weights_only=True): {refusal}; nothing of it ran"
        )
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return MemoryBudgetExceeded(
            f"Loading {path.name} ran out of memory on {device_str(device)} "
            f"({_first_line(exc)}): unload other models or lower the memory budget"
        )
    if isinstance(exc, (OSError, ValueError, RuntimeError, TypeError, KeyError, AttributeError,
                        IndexError, EOFError, StrictDataclassError)):  # fmt: skip
        log.warning("loading %s failed", path, exc_info=exc)
        return UnsupportedModel(
            f"Model files in {path.name} could not be loaded: {_first_line(exc)}"
        )
    return exc


def load(
    manifest: Manifest, path: Path, device: torch.device, allow_pickle: bool = False
) -> LoadedModel:
    """Load an installed model onto ``device`` and measure it. Blocking: call it in a
    worker thread. Raises ``UnsupportedModel`` / ``PickleNotAllowed`` / ``PickleRefused`` /
    ``MalformedWeights`` before reading weights when the model cannot or may not be
    loaded (``preflight``; the registry also sizes it from its config first)."""
    path = Path(path)
    checked = preflight(manifest, path, device.type, allow_pickle, from_config=False)
    info = checked.info
    estimate = checked.weights_bytes

    started = time.perf_counter()
    before = read_allocator(device)
    parts = _build(info, path, device, checked.safetensors)
    after = read_allocator(device)
    seconds = time.perf_counter() - started

    exact = weights_bytes(parts.model, parts.vocoder)
    if device.type == "cpu":
        allocated = reserved = exact
    else:
        allocated = max(0, after.allocated - before.allocated)
        reserved = max(0, after.reserved - before.reserved)
    return LoadedModel(
        name=manifest.name,
        family=info.family,
        task=info.task,
        device=device_str(device),
        model=parts.model,
        processor=parts.processor,
        vocoder=parts.vocoder,
        sample_rate=parts.sample_rate,
        parameters=count_parameters(parts.model, parts.vocoder),
        allocated_bytes=allocated,
        reserved_bytes=reserved,
        weights_bytes=exact,
        estimated_bytes=estimate,
        load_seconds=seconds,
        extra={**parts.extra, "model_type": info.model_type},
    )
