"""The ``torchaudio`` source: the weight files of a torchaudio Tacotron2 text-to-speech bundle.

``model_id`` names a bundle of ``torchaudio.pipelines`` (``TACOTRON2_WAVERNN_CHAR_LJSPEECH``,
``TACOTRON2_GRIFFINLIM_CHAR_LJSPEECH``). Its Tacotron2 weights, and the WaveRNN vocoder's
when the bundle has one, come from download.pytorch.org (or the configured mirror) through
the fetch engine. torchaudio is read for metadata only: it never downloads anything itself.
torchaudio publishes no digests for these files, so the sha256 of what arrived is recorded.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from modelhost.errors import InvalidRequest, ModelNotFound
from modelhost.fetch import FileSpec
from modelhost.packages import missing_dependency
from modelhost.sources.base import DownloadRequest, Plan, SourceContext, decide_pickles
from modelhost.spec import ModelSpec

MODEL_ID = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
BASE_URL = "https://download.pytorch.org/torchaudio/models"
AUDIO_EXTRA = (
    "pip install 'modelhost[audio]' (torchaudio must be the release built for your torch, "
    "see the README's torchaudio section)"
)


def tts_bundle_names(pipelines: Any) -> list[str]:
    """The Tacotron2 text-to-speech bundles ``torchaudio.pipelines`` offers."""
    kind = pipelines.Tacotron2TTSBundle
    return sorted(n for n in dir(pipelines) if isinstance(getattr(pipelines, n, None), kind))


def needs_phonemizer(name: str) -> bool:
    """Whether the bundle reads phonemes (torchaudio's ``*_PHONE_*`` bundles) not characters."""
    return "_PHONE_" in name


def weight_files(bundle: Any) -> list[str]:
    """The file names the bundle loads: Tacotron2's, then WaveRNN's when it has a vocoder."""
    names = [getattr(bundle, "_tacotron2_path", None), getattr(bundle, "_wavernn_path", None)]
    if names[0] is None:
        raise InvalidRequest(
            f"This torchaudio ({_version()}) does not say which file holds {bundle!r}'s "
            "weights; modelhost reads it from the bundle's _tacotron2_path",
            error="Unsupported torchaudio",
        )
    return [n for n in names if n]


def _version() -> str:
    import torchaudio

    return str(torchaudio.__version__)


def resolve_bundle(model_id: str) -> Any:
    """The ``Tacotron2TTSBundle`` that ``model_id`` names, or a 4xx saying what exists."""
    try:
        from torchaudio import pipelines
    except ModuleNotFoundError as exc:
        raise missing_dependency(exc.name or "torchaudio", "The torchaudio source") from exc
    except ImportError as exc:  # installed, but broken (e.g. built for another torch)
        raise InvalidRequest(
            f"The torchaudio source needs torchaudio, which fails to import ({exc}): "
            f"{AUDIO_EXTRA}",
            error="torchaudio broken",
        ) from exc
    if not MODEL_ID.fullmatch(model_id):
        raise InvalidRequest(
            f"Invalid model_id {model_id!r}: name a torchaudio pipeline bundle in capitals, "
            "e.g. 'TACOTRON2_WAVERNN_CHAR_LJSPEECH'",
            error="Invalid model id",
        )
    known = tts_bundle_names(pipelines)
    bundle = getattr(pipelines, model_id, None)
    if bundle is None:
        close = difflib.get_close_matches(model_id, known, n=3, cutoff=0.5)
        raise ModelNotFound(
            f"torchaudio has no bundle {model_id!r}"
            + (f"; close: {', '.join(close)}" if close else "")
            + f". Text-to-speech bundles: {', '.join(known)}",
            error="Unknown torchaudio bundle",
        )
    if model_id not in known:
        raise InvalidRequest(
            f"{model_id} is not a text-to-speech bundle; the torchaudio source serves "
            f"Tacotron2 bundles: {', '.join(known)}",
            error="Not a TTS bundle",
        )
    if needs_phonemizer(model_id):
        chars = model_id.replace("_PHONE_", "_CHAR_")
        raise InvalidRequest(
            f"{model_id} reads phonemes made by DeepPhonemizer (the pip package "
            "'deep-phonemizer') from its en_us_cmudict_forward.pt checkpoint, which modelhost "
            f"does not install or run; use {chars}, which reads characters",
            error="Bundle needs DeepPhonemizer",
        )
    return bundle


class TorchaudioSource:
    name = "torchaudio"

    def plan(self, request: DownloadRequest, context: SourceContext) -> Plan:
        """The bundle's weight files, from download.pytorch.org or the mirror."""
        bundle = resolve_bundle(request.model_id)
        if request.vocoder_model:
            raise InvalidRequest(
                f"{request.model_id} brings its own vocoder (WaveRNN or Griffin-Lim, by its "
                "name); drop vocoder_model",
                error="Bundle has its own vocoder",
            )
        convert = decide_pickles(
            weight_files(bundle),
            context.pickle_policy,
            request.allow_pickle,
            "torchaudio publishes its weights as pickled .pth files. Set "
            '"allow_pickle": true to install them; they are loaded with '
            "torch.load(weights_only=True), which reads tensors and runs no code",
        )
        base = (context.mirrors.get(self.name) or BASE_URL).rstrip("/")
        files = []
        for filename in weight_files(bundle):
            url = f"{base}/{filename}"
            files.append(
                FileSpec(
                    url=url, path=filename, size=context.engine.probe(url, context.cancel).size
                )
            )
        vocoder = "wavernn" if len(files) > 1 else "griffinlim"
        return Plan(
            source=self.name,
            model_id=request.model_id,
            task="text-to-speech",
            files=files,
            revision=f"torchaudio {_version()}",
            spec=ModelSpec(
                model_type="tts",
                description=f"torchaudio {request.model_id}: Tacotron2 with a {vocoder} vocoder",
                load_as=f"torchaudio:{request.model_id}",
                vocoder=vocoder,
                # Griffin-Lim is an algorithm: nothing to download for it.
                vocoder_models=[spec.path for spec in files[1:]],
            ),
            convert=convert,
        )
