"""Final job states are final: a late write (a transfer thread's progress flush that lost
the race with the job's end) can never move a completed, failed or cancelled job back to
downloading, nor make a restart resume it."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from fileserver import Rate

from modelhost.jobs import manager as manager_module
from modelhost.jobs.db import JobRepository
from modelhost.jobs.models import Job, JobState, utcnow


def make_job(**fields) -> Job:
    values = dict(
        id="abcdef123456",
        key="k" * 32,
        name="m",
        source="url",
        model_id="http://127.0.0.1:1/m.bin",
        state=JobState.DOWNLOADING,
        message="Downloading",
        request={"source": "url", "model_id": "http://127.0.0.1:1/m.bin", "name": "m"},
    )
    values.update(fields)
    return Job(**values)


@pytest.mark.parametrize("final", [JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED])
def test_a_stale_progress_write_after_the_end_leaves_the_row_final(tmp_path, final):
    repository = JobRepository(f"sqlite:///{tmp_path / 'state.db'}")
    running = make_job(bytes_done=10, bytes_total=100)
    repository.insert(running)
    # The flusher took its copy while the job was still downloading...
    stale = running.evolve(bytes_done=60)
    # ...the job ended and recorded its final state...
    ended = running.evolve(state=final, message=f"ended {final.value}", finished_at=utcnow())
    wrote_end = repository.save(ended)
    # ...and only then did the flusher's write land.
    wrote_stale = repository.save(stale)
    row = repository.get(running.id)
    assert row is not None and row.state == final
    assert (row.message, row.bytes_done, row.finished_at) == (ended.message, 10, ended.finished_at)
    assert repository.list([JobState.PENDING, JobState.DOWNLOADING]) == []
    assert (wrote_end, wrote_stale) == (True, False)
    repository.close()


def test_a_running_row_still_takes_progress_and_its_final_state(tmp_path):
    repository = JobRepository(f"sqlite:///{tmp_path / 'state.db'}")
    job = make_job(state=JobState.PENDING)
    repository.insert(job)
    for step in (
        job.evolve(state=JobState.DOWNLOADING),
        job.evolve(state=JobState.DOWNLOADING, bytes_done=5),
        job.evolve(state=JobState.LOADING, bytes_done=9),
        job.evolve(state=JobState.COMPLETED, bytes_done=9, finished_at=utcnow()),
    ):
        assert repository.save(step) is True
        assert repository.get(job.id) == step
    repository.close()


def test_a_completed_job_overwritten_late_is_not_resumed_by_a_restart(
    make_server, fileserver, tmp_path
):
    fileserver.add("/model.safetensors", b"\1" * 4096)
    home = tmp_path / "home"
    first = make_server([fileserver.host_port], home=home)
    body = {"source": "url", "model_id": fileserver.url("/model.safetensors"), "name": "m"}
    download_id = first.client.post("/models/download", json=body).json()["download_id"]
    assert first.wait_for(download_id)["status"] == "completed"
    first.stop()

    # A flush from a transfer thread, queued while the job was downloading, lands late.
    repository = JobRepository(first.settings.database_url)
    completed = repository.get(download_id)
    assert completed is not None and completed.state == JobState.COMPLETED
    stale = dataclasses.replace(
        completed, state=JobState.DOWNLOADING, message="Downloading", finished_at=None
    )
    repository.save(stale)
    assert repository.get(download_id) == completed
    repository.close()

    second = make_server([fileserver.host_port], home=home)
    status = second.client.get(f"/models/download/status/{download_id}").json()
    assert status["status"] == "completed"
    assert status["message"] == completed.message  # not "Resuming after restart"
    downloads = second.client.get("/models/downloads").json()
    assert all(d["status"] == "completed" for d in downloads["downloads"]), downloads
    reread = JobRepository(first.settings.database_url)
    assert reread.get(download_id) == completed  # the restart did not touch it
    reread.close()


def test_a_progress_flush_that_lands_after_the_end_does_not_reopen_the_job(
    make_server, fileserver, monkeypatch
):
    """The real race, forced: the flusher's write of a 'downloading' copy is held in its
    worker thread until the job has recorded 'completed', then lands."""
    completed = threading.Event()
    late_writes: list[str] = []
    original = JobRepository.save

    def racing_save(self, job):
        if job.state == JobState.DOWNLOADING and job.bytes_done > 0:  # a progress flush
            completed.wait(10)
            late_writes.append(job.state.value)
        written = original(self, job)
        if job.state == JobState.COMPLETED:
            completed.set()
        return written

    monkeypatch.setattr(JobRepository, "save", racing_save)
    monkeypatch.setattr(manager_module, "PROGRESS_FLUSH_S", 0.05)
    fileserver.add("/slow.safetensors", b"\2" * 40_000, faults=[Rate(100_000)])
    server = make_server([fileserver.host_port])
    body = {"source": "url", "model_id": fileserver.url("/slow.safetensors"), "name": "slow"}
    download_id = server.client.post("/models/download", json=body).json()["download_id"]
    assert server.wait_for(download_id)["status"] == "completed"
    deadline = time.monotonic() + 5
    while not late_writes and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # the late write has run its UPDATE
    assert late_writes, "no progress flush raced the end: the test forced nothing"
    repository = JobRepository(server.settings.database_url)
    row = repository.get(download_id)
    repository.close()
    assert row is not None and row.state == JobState.COMPLETED
    status = server.client.get(f"/models/download/status/{download_id}").json()
    assert status["status"] == "completed"
