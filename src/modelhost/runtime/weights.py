"""The stored weights of an installed model: their format, and the memory they will take.

``estimate_bytes`` reads each safetensors header (8-byte length + JSON: dtype and shape per
tensor) to count elements per dtype, then prices them at the dtype the loader will use:
float32 for floating tensors on CPU/MPS (the loaders load there in float32), the stored
dtype on CUDA. Pickled weights cannot be read without unpickling, so they count at their
file size. Buffers that are not saved (e.g. position ids) are not in the estimate.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from modelhost.runtime.errors import PickleNotAllowed, UnsupportedModel
from modelhost.store.manifest import Manifest

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Element sizes of the safetensors dtype names.
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "C64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class WeightFile:
    """One weights file of the model, relative to its directory."""

    path: str
    size: int

    @property
    def is_safetensors(self) -> bool:
        return self.path.endswith(SAFETENSORS_SUFFIX)

    @property
    def is_pickled(self) -> bool:
        return self.path.endswith(PICKLE_SUFFIXES) and not self.path.endswith("training_args.bin")

    @property
    def folder(self) -> str:
        return str(PurePosixPath(self.path).parent)


def _listed_files(manifest: Manifest, path: Path) -> Iterable[tuple[str, int]]:
    """(relative path, size) of the model's files: the manifest's, else the directory's."""
    if manifest.files:
        for entry in manifest.files:
            yield entry.path, entry.size
        return
    root = Path(path)
    for dirpath, _dirs, names in os.walk(root, followlinks=True):
        for name in names:
            full = Path(dirpath) / name
            yield full.relative_to(root).as_posix(), full.stat().st_size


def weight_files(manifest: Manifest, path: Path) -> list[WeightFile]:
    """The weights the loaders will read: per folder, the safetensors files when there are
    any (Transformers prefers them), else the pickled ones."""
    files = [
        WeightFile(p, s)
        for p, s in _listed_files(manifest, path)
        if p.endswith(SAFETENSORS_SUFFIX) or p.endswith(PICKLE_SUFFIXES)
    ]
    files = [f for f in files if f.is_safetensors or f.is_pickled]
    safetensor_folders = {f.folder for f in files if f.is_safetensors}
    return [f for f in files if f.is_safetensors or f.folder not in safetensor_folders]


def check_pickle(manifest: Manifest, path: Path, allow_pickle: bool) -> bool:
    """Whether the weights are all safetensors. Raises ``PickleNotAllowed`` when some folder
    has only pickled weights and ``allow_pickle`` is false."""
    files = weight_files(manifest, path)
    if not files:
        raise UnsupportedModel(
            f"Model {manifest.name!r} has no weights files (*.safetensors, or pickled *.bin / "
            "*.pt with opt-in)"
        )
    pickled = [f.path for f in files if f.is_pickled]
    if pickled and not allow_pickle:
        raise PickleNotAllowed(
            f"Model {manifest.name!r} has only pickled weights ({', '.join(pickled[:3])}), "
            "which can run code when loaded. Load it with allow_pickle=true to accept them "
            "(they are loaded with torch.load(weights_only=True))"
        )
    return not pickled


def safetensors_header(file: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets)."""
    with open(file, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise UnsupportedModel(f"{file} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER:
            raise UnsupportedModel(f"{file} has an implausible safetensors header")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def estimate_bytes(manifest: Manifest, path: Path, device_type: str) -> int:
    """Bytes the model's weights will take once loaded on a ``device_type`` device."""
    total = 0
    for weight in weight_files(manifest, path):
        if not weight.is_safetensors:
            total += weight.size
            continue
        for tensor in safetensors_header(Path(path) / weight.path).values():
            dtype = tensor.get("dtype", "F32")
            numel = 1
            for dim in tensor.get("shape", []):
                numel *= int(dim)
            size = DTYPE_BYTES.get(dtype, 4)
            if dtype in FLOAT_DTYPES and device_type != "cuda":
                size = 4
            total += numel * size
    return total
