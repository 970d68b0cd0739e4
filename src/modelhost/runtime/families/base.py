"""The protocol every model family implements, and the shared defaults.

A family adapter owns everything modelhost does differently per family: recognising an
installed model (``detect``), pricing it before loading (``estimate_bytes``), building it
(``load``), serving it (``predict`` and/or ``synthesize``), the representative input
``optimize`` measures (``probe``) and whether requests to it can be batched
(``batching``). The registry (``families.registry``) lists the adapters; this module and
the adapters' modules import no torch at import time (the server starts without it).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from modelhost.runtime.errors import UnsupportedModel
from modelhost.runtime.families.vocabulary import (
    SUPPORTED,
    Family,
    FamilyInfo,
    canonical_task,
    family_name,
    read_config,
    task_from_architectures,
)
from modelhost.store.manifest import Manifest

if TYPE_CHECKING:  # annotations only: no torch on import
    import torch
    from torch import nn

    from modelhost.runtime.loaded import LoadedModel
    from modelhost.runtime.probes import Probe
    from modelhost.runtime.wav import Audio


@dataclass(frozen=True)
class BatchSupport:
    """Whether concurrent requests of each kind can be coalesced into one forward pass."""

    predict: bool = False
    synthesize: bool = False


@dataclass(frozen=True)
class BatchPlan:
    """How one request joins a batch on the model's worker: requests with equal ``group``
    keys may run as one call of ``run``, which takes their ``payload``s and returns one
    result (or exception) per payload, in order. ``items``: the inputs it brings (a list
    input counts as its items). ``run_one``: the request alone, when that is not the plain
    ``predict`` / ``synthesize`` (None)."""

    group: Hashable
    items: int
    payload: Any
    run: Callable[[Sequence[Any]], list[Any]]
    run_one: Callable[[], Any] | None = None


@dataclass
class Parts:
    """What a family loader returns: the objects, on the CPU or already on the device."""

    model: nn.Module
    processor: Any = None
    vocoder: nn.Module | None = None
    sample_rate: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadOptions:
    """How a load was asked for: the target device, whether only safetensors are read, and
    whether the weights are streamed onto the device (``runtime.pretrained``: CUDA loads
    with ``MODELHOST_GPU_STREAM`` on)."""

    device: torch.device
    safetensors: bool
    stream: bool = False

    def hf_kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` keyword arguments (local files only, dtype, safetensors)."""
        import torch  # here, not at the top: adapters are imported before any load

        return {
            "local_files_only": True,
            # Pickles were allowed (check_pickle): each folder then takes safetensors where
            # it has them and its .bin otherwise (a bundle may mix the two).
            "use_safetensors": True if self.safetensors else None,
            "dtype": "auto" if self.device.type == "cuda" else torch.float32,
        }


@dataclass(frozen=True)
class SmokeRequest:
    """A small real request ``optimize`` sends to a candidate model to check it serves."""

    kind: str  # "predict" or "synthesize"
    kwargs: dict[str, Any]


class DetectContext:
    """The evidence about one installed model, each piece read once and only when asked."""

    def __init__(self, manifest: Manifest, path: Path) -> None:
        self.manifest = manifest
        self.path = Path(path)
        self.load_as = manifest.spec.load_as or ""

    @cached_property
    def config(self) -> dict[str, Any]:
        """``config.json`` (``{}`` when there is none; ``UnsupportedModel`` when invalid)."""
        return read_config(self.path)

    @cached_property
    def model_type(self) -> str | None:
        return self.config.get("model_type") or self.manifest.spec.architecture

    @cached_property
    def architectures(self) -> tuple[str, ...]:
        return tuple(str(a) for a in self.config.get("architectures") or ())

    @cached_property
    def task(self) -> str | None:
        """The installed task, canonical (``UnsupportedModel`` for an unknown one)."""
        return canonical_task(self.manifest.task)

    @property
    def encoder_decoder(self) -> bool:
        return bool(self.config.get("is_encoder_decoder"))

    @cached_property
    def sentence_transformers(self) -> bool:
        return (self.path / "modules.json").is_file()

    @cached_property
    def resolved_task(self) -> str | None:
        """The installed task, or the one the recorded head names when none was installed."""
        if self.task is not None:
            return self.task
        return task_from_architectures(
            self.architectures, self.encoder_decoder, self.sentence_transformers
        )

    def info(self, family: Family | str, task: str, **kwargs: Any) -> FamilyInfo:
        """A ``FamilyInfo`` carrying this model's config evidence."""
        return FamilyInfo(family, task, self.model_type, self.architectures, self.config, **kwargs)

    def unsupported(self, reason: str) -> UnsupportedModel:
        """The error for a model this family recognises but cannot load, naming the evidence."""
        found = (
            f"model_type {self.model_type!r}, architectures {list(self.architectures)}, "
            f"task {self.task!r}"
        )
        return UnsupportedModel(
            f"Cannot load {self.manifest.name!r} ({found}): {reason}. Supported: {SUPPORTED}"
        )


PredictFn = Callable[["LoadedModel", "nn.Module", Any, dict], dict]
# (loaded, text, speaker, max_new_tokens, seed) -> Audio; the adapter takes the model's lock
# (``runtime.compute.speech.speak_one`` for one waveform at a time).
SynthesizeFn = Callable[["LoadedModel", str, Any, "int | None", "int | None"], "Audio"]


@runtime_checkable
class FamilyAdapter(Protocol):
    """One model family. ``predict`` / ``synthesize`` are None when the family does not
    serve that kind of request."""

    name: str
    batching: BatchSupport
    predict: PredictFn | None
    synthesize: SynthesizeFn | None

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        """This family's ``FamilyInfo`` for the model, None when the model is not of it;
        raises ``UnsupportedModel`` for a model of this family that cannot be loaded."""
        ...

    def check_weights(self, manifest: Manifest, path: Path, allow_pickle: bool) -> bool:
        """Apply the pickle policy; True when only safetensors will be read."""
        ...

    def estimate_bytes(
        self, info: FamilyInfo, manifest: Manifest, path: Path, device_type: str
    ) -> int:
        """What the model takes loaded on ``device_type``, before anything is allocated."""
        ...

    def config_size(self, info: FamilyInfo, path: Path, device_type: str) -> tuple[int, int]:
        """Parameters and bytes of the architecture config.json declares ((0, 0): unsized)."""
        ...

    def load(self, info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
        """Build the model (on the CPU or ``options.device``) from the installed files."""
        ...

    def probe(self, loaded: LoadedModel) -> Probe:
        """The representative forward pass ``optimize`` measures and compares."""
        ...

    def smoke(self, loaded: LoadedModel) -> SmokeRequest:
        """A small real request a candidate model must serve."""
        ...

    def predict_batch(self, loaded: LoadedModel, inputs: Any, params: dict) -> BatchPlan | None:
        """How this predict request batches (asked when ``batching.predict``); None: alone.
        Check the request here, so a bad one fails alone and never joins a batch."""
        ...

    def synthesize_batch(
        self, loaded: LoadedModel, text: str, speaker: Any, seed: int | None
    ) -> BatchPlan | None:
        """How this synthesize request batches (asked when ``batching.synthesize``)."""
        ...


class Adapter:
    """Defaults for a ``FamilyAdapter``: the shared pickle policy and weights estimator, no
    config sizing, no probe, no batching. Subclasses set ``name`` and define ``detect``,
    ``load`` and ``predict`` or ``synthesize``."""

    name: ClassVar[str] = ""
    batching: ClassVar[BatchSupport] = BatchSupport()
    # The Transformers class the family builds, to size it from config.json on the meta
    # device (None: the stored weights' size is the estimate).
    sized_as: ClassVar[str | None] = None
    predict: Any = None
    synthesize: Any = None

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        raise NotImplementedError

    def check_weights(self, manifest: Manifest, path: Path, allow_pickle: bool) -> bool:
        from modelhost.runtime.weights import check_pickle, check_pickled_weights

        safetensors = check_pickle(manifest, path, allow_pickle)
        if not safetensors:  # every pickled file goes through torch's restricted unpickler
            check_pickled_weights(manifest, path)
        return safetensors

    def estimate_bytes(
        self, info: FamilyInfo, manifest: Manifest, path: Path, device_type: str
    ) -> int:
        from modelhost.runtime.weights import estimate_bytes

        return estimate_bytes(manifest, path, device_type)

    def config_size(self, info: FamilyInfo, path: Path, device_type: str) -> tuple[int, int]:
        if self.sized_as is None:
            return 0, 0
        from modelhost.runtime.sizing import config_size  # imports torch: not at the top

        return config_size(path, device_type, self.sized_as)

    def load(self, info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
        raise NotImplementedError

    def probe(self, loaded: LoadedModel) -> Probe:
        raise UnsupportedModel(
            f"optimize has no representative input for {family_name(loaded.family)} models "
            "yet, so it cannot measure a change; the model is served as loaded"
        )

    def predict_batch(self, loaded: LoadedModel, inputs: Any, params: dict) -> BatchPlan | None:
        return None

    def synthesize_batch(
        self, loaded: LoadedModel, text: str, speaker: Any, seed: int | None
    ) -> BatchPlan | None:
        return None

    def voices(self, loaded: LoadedModel) -> list[str]:
        """The model's own voice names for the speech API (``voice``); one voice, "default",
        unless the family knows more. Optional for adapters not built on ``Adapter``."""
        return ["default"]

    def speaker_for_voice(self, loaded: LoadedModel, voice: str) -> Any:
        """The ``speaker`` argument ``synthesize`` takes for one of ``voices(loaded)``
        (None: the family's default voice)."""
        return None

    def smoke(self, loaded: LoadedModel) -> SmokeRequest:
        if self.synthesize is not None:
            return SmokeRequest("synthesize", {"text": "hello world", "max_new_tokens": 8})
        return SmokeRequest("predict", {"inputs": "hello world", "parameters": {}})
