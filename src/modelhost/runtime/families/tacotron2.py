"""A torchaudio Tacotron2 text-to-speech bundle (``load_as "torchaudio:<bundle>"``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.packages import missing_dependency
from modelhost.runtime.errors import UnsupportedModel
from modelhost.runtime.families.base import Adapter, DetectContext, LoadOptions, Parts
from modelhost.runtime.families.vocabulary import Family, FamilyInfo

if TYPE_CHECKING:  # annotations only: no torch on import
    from modelhost.runtime.loaded import LoadedModel
    from modelhost.runtime.wav import Audio


class Tacotron2Adapter(Adapter):
    """Tacotron2 + WaveRNN (or Griffin-Lim), one speaker, English letters."""

    name = Family.TACOTRON2.value

    def detect(self, ctx: DetectContext) -> FamilyInfo | None:
        if not ctx.load_as.startswith("torchaudio:"):
            return None
        bundle = ctx.load_as.split(":", 1)[1]
        return FamilyInfo(Family.TACOTRON2, "text-to-speech", bundle, (), {})

    def load(self, info: FamilyInfo, path: Path, options: LoadOptions) -> Parts:
        return _load_parts(info, path, {})

    def synthesize(
        self,
        loaded: LoadedModel,
        text: str,
        speaker: Any,
        max_new_tokens: int | None,
        seed: int | None,
    ) -> Audio:
        # runtime.compute imports torch: here, not at the module's top
        from modelhost.runtime.compute.speech import speak_one
        from modelhost.runtime.compute.waveforms import tacotron2_waveform

        return speak_one(loaded, lambda m: tacotron2_waveform(loaded, m, text, speaker), seed)


def _load_parts(info: FamilyInfo, path: Path, kwargs: dict[str, Any]) -> Parts:
    """A torchaudio Tacotron2 bundle built by torchaudio from the installed weight files.

    torchaudio's own getters build the models; their ``load_state_dict_from_url`` finds each
    file already in ``path`` (checked first, so it never downloads) and reads it with
    ``weights_only=True``."""
    try:
        from torchaudio import pipelines
    except ImportError as exc:
        raise missing_dependency(
            "torchaudio", f"Loading {path.name} (a torchaudio bundle)"
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
