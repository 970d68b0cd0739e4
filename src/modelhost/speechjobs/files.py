"""A speech job's audio on disk: ``MODELHOST_HOME/speech/<id>/``.

``000000.f32`` ... : each finished sentence's samples (little-endian float32, mono), written
to a temporary name, fsynced, renamed into place and the directory fsynced, so a sentence
file exists exactly when all its samples are on disk. ``meta.json`` (the sample rate) is
written the same way before the first sentence. ``audio.<fmt>``: the encoded result,
written once on completion; the sentence files are removed after it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported by the methods that need it: not at server start
    import numpy as np

SENTENCE_SUFFIX = ".f32"
META = "meta.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` at ``path``, all or nothing, durable once this returns. Raises
    ``FileNotFoundError`` when the directory is gone (the job was deleted meanwhile)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class SentenceFiles:
    """The per-job directories under ``root`` (blocking; callers run it in threads)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def directory(self, job_id: str) -> Path:
        return self.root / job_id

    def create(self, job_id: str) -> None:
        """The job's (empty) directory; made at submission, so a write into a deleted
        job's directory fails instead of bringing it back."""
        self.directory(job_id).mkdir(parents=True, exist_ok=True)

    def exists(self, job_id: str) -> bool:
        return self.directory(job_id).is_dir()

    def sentence_path(self, job_id: str, index: int) -> Path:
        return self.directory(job_id) / f"{index:06d}{SENTENCE_SUFFIX}"

    def sample_rate(self, job_id: str) -> int | None:
        """The sample rate the job's sentences were written at (None before the first)."""
        try:
            return int(json.loads((self.directory(job_id) / META).read_text("utf-8"))["rate"])
        except FileNotFoundError:
            return None

    def write_sentence(self, job_id: str, index: int, samples: np.ndarray, rate: int) -> None:
        """Sentence ``index``'s samples, durably (``meta.json`` first for the first one)."""
        directory = self.directory(job_id)
        known = self.sample_rate(job_id)
        if known is None:
            write_atomic(directory / META, json.dumps({"rate": int(rate)}).encode())
        elif known != rate:
            raise ValueError(
                f"the model now speaks at {rate} Hz, the job's first sentences at {known} Hz"
            )
        import numpy as np

        data = np.ascontiguousarray(samples, dtype="<f4").reshape(-1)
        write_atomic(self.sentence_path(job_id, index), data.tobytes())

    def first_missing(self, job_id: str, total: int) -> int:
        """The first sentence without a file: where a resumed job starts."""
        index = 0
        while index < total and self.sentence_path(job_id, index).is_file():
            index += 1
        return index

    def read_all(self, job_id: str, total: int) -> np.ndarray:
        """Every sentence's samples, concatenated in order."""
        import numpy as np

        parts = [
            np.fromfile(self.sentence_path(job_id, i), dtype="<f4").astype(np.float32)
            for i in range(total)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def audio_path(self, job_id: str, fmt: str) -> Path:
        return self.directory(job_id) / f"audio.{fmt}"

    def write_audio(self, job_id: str, fmt: str, data: bytes) -> None:
        write_atomic(self.audio_path(job_id, fmt), data)

    def drop_sentences(self, job_id: str) -> None:
        """Remove the sentence files (the encoded audio is kept, or there will be none)."""
        directory = self.directory(job_id)
        if not directory.is_dir():
            return
        for path in directory.glob(f"*{SENTENCE_SUFFIX}"):
            path.unlink(missing_ok=True)

    def job_ids(self) -> list[str]:
        """The jobs that have a directory here."""
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.is_dir()]

    def remove(self, job_id: str) -> None:
        """The job's directory and everything in it."""
        shutil.rmtree(self.directory(job_id), ignore_errors=True)
