"""The stored weights of an installed model: their format, and the memory they will take.

``estimate_bytes`` reads each safetensors header (8-byte length + JSON: dtype and shape per
tensor) to count elements per dtype, then prices them at the dtype the loader will use:
float32 for floating tensors on CPU/MPS (the loaders load there in float32), the stored
dtype on CUDA. Pickled weights cannot be read without unpickling, so they count at their
file size. Buffers that are not saved (e.g. position ids) are not in the estimate.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from modelhost.runtime.errors import (
    MalformedWeights,
    PickleNotAllowed,
    PickleRefused,
    UnsupportedModel,
)
from modelhost.store.manifest import Manifest

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Element sizes, in bits, of the safetensors dtype names (the format's full list: sub-byte
# floats included, so a valid file is never refused for its dtype).
DTYPE_BITS = {
    "F64": 64, "I64": 64, "U64": 64, "C64": 64,
    "F32": 32, "I32": 32, "U32": 32,
    "F16": 16, "BF16": 16, "I16": 16, "U16": 16,
    "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "I8": 8, "U8": 8, "BOOL": 8,
    "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
}  # fmt: skip
FLOAT_DTYPES = {n for n in DTYPE_BITS if n.startswith(("F", "BF"))}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own cap
MAX_TENSORS = 100_000  # far above any real checkpoint (a few thousand per file)


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
    # The install's opt-in is remembered, so loading again after an unload needs no repeat.
    allow_pickle = allow_pickle or manifest.spec.allows_pickle
    if pickled and not allow_pickle:
        raise PickleNotAllowed(
            f"Model {manifest.name!r} has only pickled weights ({', '.join(pickled[:3])}), "
            "which can run code when loaded. Load it with allow_pickle=true to accept them "
            "(they are loaded with torch.load(weights_only=True))"
        )
    return not pickled


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header, checked: its dtype, shape and byte range."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _malformed(name: str, what: str) -> MalformedWeights:
    return MalformedWeights(
        f"{name} is malformed: {what}. Reinstall the model, or check the file's source"
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_entry(name: str, key: str, value: object) -> TensorEntry:
    """One header entry checked for types: dtype known, shape and offsets non-negative ints."""
    if not isinstance(value, dict):
        raise _malformed(name, f"tensor {key!r} is not a JSON object")
    unknown = set(value) - {"dtype", "shape", "data_offsets"}
    if unknown or len(value) != 3:
        raise _malformed(name, f"tensor {key!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _malformed(name, f"tensor {key!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _malformed(name, f"tensor {key!r} has a shape that is not a list of integers >= 0")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise _malformed(name, f"tensor {key!r} has data_offsets that are not two integers >= 0")
    begin, end = offsets
    if end < begin:
        raise _malformed(name, f"tensor {key!r} ends (byte {end}) before it begins ({begin})")
    entry = TensorEntry(dtype, tuple(shape), begin, end)
    bits = entry.numel * DTYPE_BITS[dtype]
    if bits % 8 or end - begin != bits // 8:
        raise _malformed(
            name,
            f"tensor {key!r} ({dtype} {list(shape)}) needs {bits / 8:g} bytes but its "
            f"data_offsets span {end - begin}",
        )
    return entry


def _check_layout(name: str, tensors: dict[str, TensorEntry], data_size: int) -> None:
    """The tensors tile the data section exactly, as the safetensors library requires."""
    position = 0
    for key, entry in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.end > data_size:
            raise _malformed(
                name,
                f"tensor {key!r} ends at byte {entry.end} of a {data_size}-byte data section "
                "(out of bounds)",
            )
        if entry.begin < position:
            raise _malformed(name, f"tensor {key!r} overlaps the tensor before it")
        if entry.begin > position:
            raise _malformed(name, f"bytes {position}-{entry.begin} belong to no tensor")
        position = entry.end
    if position != data_size:
        raise _malformed(
            name, f"the data section is {data_size} bytes but the tensors cover {position}"
        )


def _read_header_json(handle: BinaryIO, name: str, file_size: int) -> tuple[dict, int]:
    """The header's JSON object and its length, checked against the cap and the file."""
    raw = handle.read(8)
    if len(raw) != 8:
        raise _malformed(name, f"it is {file_size} bytes, too short to be a safetensors file")
    (length,) = struct.unpack("<Q", raw)
    if length > MAX_HEADER:
        raise _malformed(
            name, f"its header claims {length} bytes, over the {MAX_HEADER // 2**20} MB cap"
        )
    if length > file_size - 8:
        raise _malformed(
            name, f"its header claims {length} bytes but the file has {file_size - 8} after it"
        )
    try:
        header = json.loads(handle.read(length).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _malformed(name, f"its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _malformed(name, "its header is not a JSON object")
    return header, length


@dataclass(frozen=True)
class SafetensorsLayout:
    """A checked safetensors file: its tensors, where their data section starts (8 + the
    header's length) and the file's size."""

    tensors: dict[str, TensorEntry]
    data_start: int
    file_size: int


def safetensors_header(file: Path, name: str | None = None) -> dict[str, TensorEntry]:
    """The checked header of a safetensors file: tensor name -> dtype, shape, byte range.

    Everything the safetensors library would trip over is checked here first, so a bad
    file is a ``MalformedWeights`` (400) naming ``name`` (default: the file's name) and what
    is wrong, before any loader sees it."""
    return safetensors_layout(file, name).tensors


def safetensors_layout(file: Path, name: str | None = None) -> SafetensorsLayout:
    """``safetensors_header`` with the data section's offset in the file (the streamer reads
    the byte ranges itself)."""
    name = name or Path(file).name
    try:
        with open(file, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            header, length = _read_header_json(handle, name, file_size)
    except OSError as exc:
        raise _malformed(name, f"it cannot be read ({exc.strerror or exc})") from None
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise _malformed(name, "__metadata__ must map names to strings")
    if len(header) > MAX_TENSORS:
        raise _malformed(
            name, f"it declares {len(header)} tensors, more than the limit of {MAX_TENSORS}"
        )
    tensors = {key: _tensor_entry(name, key, value) for key, value in header.items()}
    _check_layout(name, tensors, file_size - 8 - length)
    return SafetensorsLayout(tensors, 8 + length, file_size)


def estimate_bytes(manifest: Manifest, path: Path, device_type: str) -> int:
    """Bytes the model's weights will take once loaded on a ``device_type`` device."""
    total = 0
    for weight in weight_files(manifest, path):
        if not weight.is_safetensors:
            total += weight.size
            continue
        header = safetensors_header(Path(path) / weight.path, weight.path)
        for tensor in header.values():
            bits = DTYPE_BITS[tensor.dtype]
            if tensor.dtype in FLOAT_DTYPES and device_type != "cuda":
                bits = 32  # the loaders load floating weights in float32 off CUDA
            total += tensor.numel * bits // 8
    return total


_GLOBAL_NAMED = re.compile(r"GLOBAL ([\w.]+)")


def check_pickled_weights(manifest: Manifest, path: Path) -> None:
    """Unpickle each pickled weights file with ``torch.load(weights_only=True)`` first, so a
    file that names a forbidden global is refused with what it tried (``PickleRefused``)
    rather than failing deep in a loader. Zip checkpoints are memory-mapped: the tensors'
    bytes are not read, only the pickle runs (in torch's restricted unpickler)."""
    import pickle
    import zipfile

    import torch

    for weight in weight_files(manifest, path):
        if not weight.is_pickled:
            continue
        file = Path(path) / weight.path
        try:
            torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
        except pickle.UnpicklingError as exc:
            found = _GLOBAL_NAMED.search(str(exc))
            what = f"it needs the global {found.group(1)}" if found else str(exc).splitlines()[0]
            raise PickleRefused(
                f"{weight.path} was refused by torch.load(weights_only=True): {what}, which "
                "only a full unpickle (able to run any code) would provide. Use a safetensors "
                "copy of these weights"
            ) from None
        except (OSError, RuntimeError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            what = f"it is not a readable torch checkpoint ({first})"
            raise _malformed(weight.path, what) from None
