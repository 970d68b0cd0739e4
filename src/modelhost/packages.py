"""Optional Python modules: which pip package brings each, and the typed refusal when one
is missing (``MissingDependency``, 424, naming the exact ``pip install``).

Imports nothing of modelhost's but ``errors``: sources (at install time) and the runtime (at
load time) both use it.
"""

from __future__ import annotations

import importlib.util
import re

from modelhost.errors import MissingDependency

# Import name -> the pip package that provides it, where the two differ or are worth naming.
# Anything else falls back to the module's top-level name.
PIP_PACKAGES: dict[str, str] = {
    "sentence_transformers": "sentence-transformers",
    "torchvision": "torchvision",
    "torchaudio": "torchaudio",
    "av": "av",
    "soundfile": "soundfile",
    "PIL": "pillow",
    "scipy": "scipy",
    "sklearn": "scikit-learn",
    "cv2": "opencv-python",
    "yaml": "pyyaml",
    "google": "protobuf",
    "sentencepiece": "sentencepiece",
    "tiktoken": "tiktoken",
    "librosa": "librosa",
    "phonemizer": "phonemizer",
    "timm": "timm",
    "accelerate": "accelerate",
    "dp": "deep-phonemizer",
}
# Notes a pip line alone would leave wrong (torchaudio must match the installed torch).
PIP_NOTES: dict[str, str] = {
    "torchaudio": " (the release built for your torch, see the README's torchaudio section; "
    "or pip install 'modelhost[audio]')",
    "torchvision": " (the release built for your torch)",
}
# Transformers' own wording when a backend library is missing ("... requires the protobuf
# library but it was not found in your environment").
_REQUIRES = re.compile(r"requires the (\S+) library")


def pip_package(module: str) -> str:
    """The pip package that provides ``module`` (its top-level name when not listed)."""
    top = module.split(".", 1)[0]
    return PIP_PACKAGES.get(module) or PIP_PACKAGES.get(top) or top


def missing_dependency(module: str, needed_for: str) -> MissingDependency:
    """The refusal naming ``module`` and the pip line that installs it; ``needed_for`` says
    what needs it ("the torchvision source", "loading model 'x'")."""
    package = pip_package(module)
    top = module.split(".", 1)[0]
    return MissingDependency(
        f"{needed_for} needs the Python module {module}, which is not installed on this "
        f"server: pip install {package}{PIP_NOTES.get(top, '')}, then restart the server",
        module=module,
        package=package,
    )


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported here, found without importing it (a module set to
    None in ``sys.modules`` counts as missing, as ``import`` treats it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken __spec__
        return False


def require_modules(modules: tuple[str, ...], needed_for: str) -> None:
    """Raise ``MissingDependency`` for the first of ``modules`` that is not installed.
    Blocking (it searches sys.path): call it in a worker thread."""
    for module in modules:
        if not is_installed(module):
            raise missing_dependency(module, needed_for)


def module_of(exc: ImportError) -> str | None:
    """The module a failed import is missing: a ``ModuleNotFoundError``'s ``name``, or the
    library Transformers says it requires. None otherwise (e.g. "cannot import name ...":
    the module is there, in another version)."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return exc.name
    found = _REQUIRES.search(str(exc))
    return found.group(1) if found else None
