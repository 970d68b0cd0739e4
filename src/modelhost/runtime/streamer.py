"""Streaming safetensors files onto a device: parallel reads, a ring of host buffers, and
device copies that overlap the next reads (the approach of Run:ai's Model Streamer and
fastsafetensors), instead of building the model on the CPU first.

The pieces, each used the same way on every device:

- ``plan_checkpoint`` / ``plan_file``: each file's header is read and checked
  (``weights.safetensors_layout``: 8-byte little-endian length + JSON of dtype, shape and
  ``data_offsets``), its data section cut into ``chunk_bytes`` chunks;
- ``stream_files``: one device tensor per tensor of the files is allocated, then
  ``threads`` readers take chunks in file order, each reading with ``os.preadv`` (the GIL is
  released) into one of its own ``buffers_per_thread`` host buffers and copying the parts of
  the chunk that belong to each tensor into that tensor's device bytes. On CUDA the buffers
  are pinned and the copies are ``non_blocking`` on the reader's own stream, so a chunk
  travels to the GPU while the next is read; a buffer is refilled only once the event
  recorded after its copies has completed. On the CPU the buffers are plain and the copies
  synchronous: the same planner, readers and ring, which is what the tests exercise;
- the tensors are views (``view(dtype).reshape(shape)``) of their device bytes.

Every header is checked before anything is allocated, so a truncated or corrupt file is a
``MalformedWeights`` naming it and nothing is loaded; a file that ends early while being read
(changed on disk since) is the same error, and what was allocated is dropped.
"""

from __future__ import annotations

import json
import os
import threading
import time
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from modelhost.runtime.errors import MalformedWeights
from modelhost.runtime.weights import TensorEntry, safetensors_layout

if TYPE_CHECKING:  # imported where used: the server starts without torch
    import torch

MiB = 2**20
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names -> torch dtype attribute names. The sub-byte floats (F4, F6_*) have
# no torch dtype to view bytes as: such files are not streamed (the caller falls back).
TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}  # fmt: skip


class StreamUnsupported(Exception):
    """The checkpoint is valid but not one the streaming path takes (no safetensors, a
    dtype torch cannot view, keys that need from_pretrained's conversions, ...): the caller
    loads it the usual way instead. The message says why, for the log."""


@dataclass(frozen=True)
class StreamSettings:
    """How a stream reads: chunk size, reader threads, and host buffers per reader."""

    chunk_bytes: int = 16 * MiB
    threads: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    buffers_per_thread: int = 2

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1 or self.threads < 1 or self.buffers_per_thread < 1:
            raise ValueError("chunk_bytes, threads and buffers_per_thread must be at least 1")


@dataclass(frozen=True)
class Chunk:
    """One read: ``length`` bytes of file ``file`` from data-section offset ``begin``."""

    file: int
    begin: int
    length: int


@dataclass(frozen=True)
class FilePlan:
    """One safetensors file: its checked tensors (in data order) and where its data starts."""

    path: Path
    name: str
    data_start: int
    data_size: int
    tensors: dict[str, TensorEntry]

    @property
    def ordered(self) -> list[tuple[str, TensorEntry]]:
        return sorted(self.tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end))


@dataclass(frozen=True)
class StreamStats:
    """What a stream moved: bytes of tensor data, files, chunks, and seconds."""

    bytes: int
    files: int
    chunks: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def plan_file(path: Path, name: str | None = None) -> FilePlan:
    """The checked layout of one safetensors file (``MalformedWeights`` when it is not one).
    Raises ``StreamUnsupported`` for a dtype torch has no type for."""
    name = name or Path(path).name
    layout = safetensors_layout(Path(path), name)
    for key, entry in layout.tensors.items():
        if entry.dtype not in TORCH_DTYPES or not _has_torch_dtype(entry.dtype):
            raise StreamUnsupported(f"{name}: tensor {key!r} is {entry.dtype}, not streamable")
    return FilePlan(
        Path(path), name, layout.data_start, layout.file_size - layout.data_start, layout.tensors
    )


def _has_torch_dtype(name: str) -> bool:
    import torch

    return hasattr(torch, TORCH_DTYPES[name])


def checkpoint_files(directory: Path) -> list[str]:
    """The safetensors files ``from_pretrained`` would read in ``directory``: model.safetensors,
    else the shards model.safetensors.index.json names. ``StreamUnsupported`` for neither."""
    directory = Path(directory)
    if (directory / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    index = directory / INDEX_FILE
    if not index.is_file():
        raise StreamUnsupported(f"{directory.name} has no {SINGLE_FILE} nor {INDEX_FILE}")
    try:
        weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MalformedWeights(
            f"{INDEX_FILE} of {directory.name} is not a valid shard index ({exc!r}). "
            "Reinstall the model, or check the file's source"
        ) from None
    for shard in shards:
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
            raise MalformedWeights(
                f"{INDEX_FILE} of {directory.name} names {shard!r}, not a file beside it"
            )
    return shards


def plan_checkpoint(directory: Path) -> list[FilePlan]:
    """Every file of a single-file or sharded checkpoint, checked, before anything is read.
    A sharded index must name each tensor in the shard that holds it."""
    directory = Path(directory)
    names = checkpoint_files(directory)
    plans = [plan_file(directory / name, name) for name in names]
    if names != [SINGLE_FILE]:  # read from the index: it must say where each tensor is
        _check_index(directory, plans)
    seen: dict[str, str] = {}
    for plan in plans:
        for key in plan.tensors:
            if key in seen:
                raise MalformedWeights(
                    f"tensor {key!r} is in both {seen[key]} and {plan.name}; reinstall the model"
                )
            seen[key] = plan.name
    return plans


def _check_index(directory: Path, plans: list[FilePlan]) -> None:
    weight_map = json.loads((directory / INDEX_FILE).read_text("utf-8"))["weight_map"]
    found = {key: plan.name for plan in plans for key in plan.tensors}
    for key, shard in weight_map.items():
        if found.get(key) != shard:
            where = f"in {found[key]}" if key in found else "in no shard"
            raise MalformedWeights(
                f"{INDEX_FILE} of {directory.name} puts {key!r} in {shard}, but it is {where}"
            )


def plan_chunks(plans: list[FilePlan], chunk_bytes: int) -> list[Chunk]:
    """Each file's data section cut into reads of at most ``chunk_bytes``, in file order."""
    chunks = []
    for number, plan in enumerate(plans):
        for begin in range(0, plan.data_size, chunk_bytes):
            chunks.append(Chunk(number, begin, min(chunk_bytes, plan.data_size - begin)))
    return chunks


def stream_files(
    plans: list[FilePlan], device: torch.device, settings: StreamSettings | None = None
) -> tuple[dict[str, torch.Tensor], StreamStats]:
    """Every tensor of ``plans`` on ``device``, read as described in the module docstring.
    Blocking: call it in a worker thread."""
    return Stream(plans, device, settings).result()


class StreamCancelled(Exception):
    """``Stream.cancel`` stopped the readers before the end."""


class Stream:
    """A stream in progress: the device tensors are allocated and the readers started when
    it is created; ``result()`` waits for them, ``cancel()`` stops them at the next chunk.
    Either way the files are closed, and on failure the device memory is dropped."""

    def __init__(
        self, plans: list[FilePlan], device: torch.device, settings: StreamSettings | None = None
    ) -> None:
        import torch

        settings = settings or StreamSettings()
        self.plans = plans
        self.started = time.perf_counter()
        self.storage = {
            key: torch.empty(entry.end - entry.begin, dtype=torch.uint8, device=device)
            for plan in plans
            for key, entry in plan.tensors.items()
        }
        self.chunks = plan_chunks(plans, settings.chunk_bytes)
        targets = [_Targets(plan, self.storage) for plan in plans]
        self.descriptors = [os.open(plan.path, os.O_RDONLY) for plan in plans]
        self.work = _Work(self.chunks)
        count = min(settings.threads, len(self.chunks))  # none when only empty tensors
        readers = [
            _Reader(self.work, plans, targets, self.descriptors, device, settings)
            for _ in range(count)
        ]
        self.threads = [
            threading.Thread(target=r.run, name=f"stream-{i}", daemon=True)
            for i, r in enumerate(readers)
        ]
        for thread in self.threads:
            thread.start()

    def _join(self) -> None:
        for thread in self.threads:
            thread.join()
        while self.descriptors:
            os.close(self.descriptors.pop())

    def result(self) -> tuple[dict[str, torch.Tensor], StreamStats]:
        """The tensors, once every chunk is on the device; the first reader's error else."""
        import torch

        self._join()
        if self.work.error is not None:
            self.storage.clear()
            raise self.work.error
        tensors = {}
        for plan in self.plans:
            for key, entry in plan.tensors.items():
                dtype = getattr(torch, TORCH_DTYPES[entry.dtype])
                tensors[key] = self.storage.pop(key).view(dtype).reshape(entry.shape)
        total = sum(plan.data_size for plan in self.plans)
        seconds = time.perf_counter() - self.started
        return tensors, StreamStats(total, len(self.plans), len(self.chunks), seconds)

    def cancel(self) -> None:
        """Stop reading, wait for the copies in flight, and drop the device memory."""
        self.work.fail(StreamCancelled())
        self._join()
        self.storage.clear()


class _Targets:
    """The tensors of one file by data offset: which device bytes a chunk's bytes go to."""

    def __init__(self, plan: FilePlan, storage: dict[str, torch.Tensor]) -> None:
        ordered = [(e, storage[k]) for k, e in plan.ordered if e.end > e.begin]
        self.begins = [entry.begin for entry, _ in ordered]
        self.entries = ordered

    def pieces(self, chunk: Chunk) -> Iterator[tuple[torch.Tensor, int, int]]:
        """(destination bytes, start, end in the chunk) for each tensor the chunk overlaps."""
        end = chunk.begin + chunk.length
        index = max(0, bisect_right(self.begins, chunk.begin) - 1)
        while index < len(self.entries):
            entry, dest = self.entries[index]
            if entry.begin >= end:
                break
            low, high = max(entry.begin, chunk.begin), min(entry.end, end)
            if high > low:
                piece = dest[low - entry.begin : high - entry.begin]
                yield piece, low - chunk.begin, high - chunk.begin
            index += 1


class _Work:
    """The chunks still to read, handed out in order, and the first error met."""

    def __init__(self, chunks: list[Chunk]) -> None:
        self._chunks = chunks
        self._next = 0
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def take(self) -> Chunk | None:
        with self._lock:
            if self.error is not None or self._next >= len(self._chunks):
                return None
            chunk = self._chunks[self._next]
            self._next += 1
            return chunk

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            self.error = self.error or exc


class _Reader:
    """One reader thread: its ring of host buffers and, on CUDA, its stream and events."""

    def __init__(
        self,
        work: _Work,
        plans: list[FilePlan],
        targets: list[_Targets],
        descriptors: list[int],
        device: torch.device,
        settings: StreamSettings,
    ) -> None:
        import torch

        self.work, self.plans, self.targets, self.descriptors = work, plans, targets, descriptors
        self.cuda = device.type == "cuda"
        self.device = device
        self.buffers = [
            torch.empty(settings.chunk_bytes, dtype=torch.uint8, pin_memory=self.cuda)
            for _ in range(settings.buffers_per_thread)
        ]
        self.events: list[torch.cuda.Event | None] = [None] * len(self.buffers)
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        if self.stream is not None:  # after whatever the device's own stream still runs
            self.stream.wait_stream(torch.cuda.current_stream(device))

    def run(self) -> None:
        try:
            slot = 0
            while (chunk := self.work.take()) is not None:
                self._wait(slot)  # the buffer's previous copies must be done before refilling
                buffer = self.buffers[slot][: chunk.length]
                self._read(chunk, buffer)
                self._copy(chunk, buffer, slot)
                slot = (slot + 1) % len(self.buffers)
            for slot in range(len(self.buffers)):
                self._wait(slot)
        except BaseException as exc:  # handed to the caller, which raises it
            self.work.fail(exc)
            for slot in range(len(self.buffers)):
                self._wait(slot)

    def _wait(self, slot: int) -> None:
        event = self.events[slot]
        if event is not None:
            event.synchronize()
            self.events[slot] = None

    def _read(self, chunk: Chunk, buffer: torch.Tensor) -> None:
        plan = self.plans[chunk.file]
        read_exactly(self.descriptors[chunk.file], buffer, plan.data_start + chunk.begin, plan)

    def _copy(self, chunk: Chunk, buffer: torch.Tensor, slot: int) -> None:
        import torch

        pieces = self.targets[chunk.file].pieces(chunk)
        if not self.cuda:
            for dest, low, high in pieces:
                dest.copy_(buffer[low:high])
            return
        with torch.cuda.stream(self.stream):
            for dest, low, high in pieces:
                dest.copy_(buffer[low:high], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.events[slot] = event


def read_exactly(fd: int, buffer: torch.Tensor, offset: int, plan: FilePlan) -> None:
    """Fill ``buffer`` (a CPU uint8 tensor) from ``fd`` at ``offset``; ``MalformedWeights``
    when the file ends first (it was truncated after its header was checked)."""
    view = memoryview(buffer.numpy()).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise MalformedWeights(
                f"{plan.name} ended at byte {offset + done}, but its header promises "
                f"{plan.data_start + plan.data_size} bytes (truncated while loading?). "
                "Reinstall the model"
            )
        done += got
