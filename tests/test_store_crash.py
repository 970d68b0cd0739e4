"""Crash consistency of the store, with real crashes: a child process commits (or deletes) a
model and is SIGKILLed right after its N-th filesystem step, for N = 0, 1, 2, ... until it
gets through; after each kill a new ``Store`` on the same root runs ``recover()`` and the
model must be exactly one whole version (or exactly absent), never a mix.

The fault is injected without a hook in the store: the child (a fork; the parent's ``os`` is
untouched) wraps the ``os`` functions that change the disk, and the wrapper kills the process
after the N-th call. ``os.fsync`` counts as a step too, so a kill lands between writing a
temp file and renaming it.

A kill loses nothing the kernel has; a power loss loses what was not fsynced. Two more tests
cover that: the order of the fsyncs against the switch, and a switch whose fsync fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

from modelhost.store import CommitFile, Manifest, ManifestFile, Store

NAME = "m"
SHARED = b"a file both versions have"
V1 = {
    "config.json": b'{"version": 1}',
    "weights.bin": b"version 1 weights " * 64,
    "shared.bin": SHARED,
    "sub/only_v1.txt": b"dropped by version 2",
}
V2 = {
    "config.json": b'{"version": 2}',
    "weights.bin": b"version 2 weights " * 64,
    "shared.bin": SHARED,
    "sub/deeper/only_v2.txt": b"added by version 2",
}
VERSIONS = {"v1": V1, "v2": V2}
# Another model sharing version 1's weights: a blob version 2 drops must survive for it.
OTHER = {"voc.bin": V1["weights.bin"]}

# The ``os`` functions through which the store changes the disk (pathlib and shutil call
# them too). A kill after any of them is a state a real crash can leave.
STEPS = ("replace", "rename", "symlink", "mkdir", "unlink", "rmdir", "chmod", "fsync")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(name: str, model_id: str) -> Manifest:
    return Manifest(name=name, source="url", model_id=model_id)


def staged(directory: Path, files: dict[str, bytes]) -> list[CommitFile]:
    """Verified files waiting outside the store, as the fetch engine leaves them."""
    directory.mkdir(parents=True, exist_ok=True)
    items = []
    for index, (path, data) in enumerate(files.items()):
        part = directory / f"{index}.part"
        part.write_bytes(data)
        items.append(CommitFile(path, part, len(data), sha(data)))
    return items


def install_legacy(root: Path, name: str, model_id: str, files: dict[str, bytes]) -> None:
    """Install ``files`` the way the store did before versioned trees: a real directory
    ``models/<name>/`` of links into blobs, a manifest without ``version_dir``."""
    store = Store(root)
    for path, data in files.items():
        blob = store.blob_path(sha(data))
        if not blob.exists():
            blob.write_bytes(data)
            blob.chmod(0o444)
        link = store.models_dir / name / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    entries = [ManifestFile(path=p, size=len(d), sha256=sha(d)) for p, d in files.items()]
    legacy = manifest(name, model_id).model_copy(update={"files": entries})
    data = legacy.model_dump(mode="json", exclude={"version_dir"})
    (store.manifests_dir / f"{name}.json").write_text(json.dumps(data, indent=2))


# --- the child ------------------------------------------------------------------------------


def _die_after(steps: int) -> None:
    """Make this process SIGKILL itself right after its ``steps``-th disk change."""
    done = 0

    def wrap(original: Callable) -> Callable:
        def step(*args, **kwargs):
            nonlocal done
            result = original(*args, **kwargs)
            done += 1
            if done >= steps:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return step

    if steps == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    for name in STEPS:
        setattr(os, name, wrap(getattr(os, name)))


def _child(root: Path, action: str, steps: int) -> None:
    store = Store(root)
    files = staged(root.parent / "partial", V2) if action == "commit" else []
    _die_after(steps)
    if action == "commit":
        store.commit(manifest(NAME, "v2"), files)
    else:
        store.delete(NAME)


def run_killed(root: Path, action: str, steps: int) -> bool:
    """Run ``action`` on the store at ``root`` in a child killed after ``steps`` disk
    changes; True when the child was killed, False when it finished first.

    A bare fork, left with ``os._exit``: the child runs nothing of pytest's, and none of
    multiprocessing's bootstrap (whose stdio flush could wait on a lock another thread of
    an xdist worker held at the fork)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _child(root, action, steps)
            code = 0
        except BaseException:
            os.write(2, traceback.format_exc().encode())
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (waited := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the child for {action} after {steps} steps hung")
        time.sleep(0.002)
    code = os.waitstatus_to_exitcode(waited[1])
    assert code in (0, -signal.SIGKILL), f"the child failed (exit code {code}); see stderr"
    return code == -signal.SIGKILL


# --- the checks -----------------------------------------------------------------------------


def tree_files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (through its links) by relative path."""
    found = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = Path(parent) / name
            found[path.relative_to(directory).as_posix()] = path.read_bytes()
    return found


def recovered_version(root: Path) -> str | None:
    """Open the store after a crash as the server does (``recover``), check that it is
    whole, and say which version of the model it holds (None: not installed)."""
    store = Store(root)
    store.recover()
    installed = {m.name: m for m in store.list()}
    assert tree_files(store.model_path("other")) == OTHER
    referenced = {f.sha256 for m in installed.values() for f in m.files}
    # Nothing a surviving manifest references was deleted, and nothing else is left.
    assert sorted(p.name for p in store.blobs_dir.iterdir()) == sorted(referenced)
    assert not [p for p in store.manifests_dir.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in store.models_dir.iterdir()) == sorted(installed)
    if NAME not in installed:
        assert not os.path.lexists(store.model_path(NAME))
        return None
    current = installed[NAME]
    files = VERSIONS[current.model_id]
    assert {f.path: f.sha256 for f in current.files} == {p: sha(d) for p, d in files.items()}
    assert tree_files(store.model_path(NAME)) == files  # every file, no file of the other
    assert store.verify(NAME) == []
    return current.model_id


def crash_at_every_step(
    tmp_path: Path, setup: Callable[[Path], None], action: str
) -> list[str | None]:
    """Kill ``action`` after 0, 1, 2, ... steps, each time on a fresh copy of ``setup``'s
    store; returns the version each kill left, then the version of the run that finished."""
    outcomes = []
    for steps in range(500):
        root = tmp_path / f"kill-{steps}" / "home"
        setup(root)
        killed = run_killed(root, action, steps)
        try:
            outcomes.append(recovered_version(root))
        except AssertionError as exc:
            raise AssertionError(f"{action} killed after {steps} disk steps: {exc}") from exc
        if not killed:
            return outcomes
    raise AssertionError("the child never finished")


def with_other(root: Path) -> None:
    Store(root).commit(manifest("other", "other"), staged(root.parent / "setup-other", OTHER))


def v1_current(root: Path) -> None:
    with_other(root)
    Store(root).commit(manifest(NAME, "v1"), staged(root.parent / "setup", V1))


def v1_legacy(root: Path) -> None:
    with_other(root)
    install_legacy(root, NAME, "v1", V1)


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("setup", [v1_current, v1_legacy], ids=["current", "legacy-layout"])
def test_a_recommit_killed_at_any_step_leaves_one_whole_version(tmp_path, setup):
    outcomes = crash_at_every_step(tmp_path, setup, "commit")
    assert set(outcomes) == {"v1", "v2"}  # the kills straddle the switch
    assert outcomes[-1] == "v2"
    switch = outcomes.index("v2")  # once version 2 is recoverable it stays so
    assert outcomes[switch:] == ["v2"] * (len(outcomes) - switch)


def test_a_first_install_killed_at_any_step_leaves_it_whole_or_absent(tmp_path):
    outcomes = crash_at_every_step(tmp_path, with_other, "commit")
    assert set(outcomes) == {None, "v2"} and outcomes[-1] == "v2"


@pytest.mark.parametrize("setup", [v1_current, v1_legacy], ids=["current", "legacy-layout"])
def test_a_delete_killed_at_any_step_leaves_it_whole_or_absent(tmp_path, setup):
    outcomes = crash_at_every_step(tmp_path, setup, "delete")
    assert set(outcomes) == {"v1", None} and outcomes[-1] is None


def test_a_store_of_the_previous_layout_opens_and_updates(tmp_path):
    root = tmp_path / "home"
    v1_legacy(root)
    store = Store(root)
    store.recover()
    assert store.get(NAME).model_id == "v1"
    assert tree_files(store.model_path(NAME)) == V1 and store.verify(NAME) == []
    store.commit(manifest(NAME, "v2"), staged(tmp_path / "partial", V2))
    assert recovered_version(root) == "v2"
    store.delete(NAME)
    assert recovered_version(root) is None


# --- durability: what a power loss (not only a kill) needs ----------------------------------


def _record_disk_calls(monkeypatch) -> list[tuple[str, str]]:
    """Record, in order, each fsync (by the path its descriptor has) and each rename (by
    its destination); the calls still run."""
    calls: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recorded_replace(src, dst, **kwargs):
        calls.append(("replace", str(dst)))
        return replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    return calls


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_everything_the_new_version_needs_is_fsynced_before_the_switch(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()  # the paths /proc gives are resolved ones
    root = tmp_path / "home"
    v1_current(root)
    files = staged(tmp_path / "partial", V2)
    calls = _record_disk_calls(monkeypatch)
    store = Store(root)
    installed = store.commit(manifest(NAME, "v2"), files)

    switch = calls.index(("replace", str(store.manifests_dir / f"{NAME}.json")))
    before, after = calls[:switch], calls[switch + 1 :]
    synced = {path for call, path in before if call == "fsync"}
    new_blobs = [f for f in files if f.sha256 not in {sha(d) for d in V1.values()}]
    assert {str(f.local_path) for f in new_blobs} <= synced  # the bytes, before the rename
    tree = store.versions_dir / installed.version_dir
    assert {str(store.blobs_dir), str(tree), str(tree / "sub"), str(tree / "sub/deeper")} <= synced
    assert str(store.versions_dir) in synced
    # The manifest's directory is fsynced before the link moves; models/ after it moves.
    link = after.index(("replace", str(store.model_path(NAME))))
    assert ("fsync", str(store.manifests_dir)) in after[:link]
    assert ("fsync", str(store.models_dir)) in after[link:]


def test_a_switch_whose_fsync_fails_keeps_both_versions_for_recover(tmp_path, monkeypatch):
    """The manifest was renamed in but fsyncing manifests/ failed: the new version is the
    model (its directory must not be removed), yet a power loss could bring the previous
    manifest back, so the previous directory stays until ``recover``."""
    import modelhost.store.store as store_module

    root = tmp_path / "home"
    v1_current(root)
    store = Store(root)
    previous = store.get(NAME).version_dir
    fsync_dir = store_module._fsync_dir

    def failing(path: Path) -> None:
        if path == store.manifests_dir:
            raise OSError(5, "Input/output error")
        fsync_dir(path)

    monkeypatch.setattr(store_module, "_fsync_dir", failing)
    with pytest.raises(OSError, match="Input/output error"):
        store.commit(manifest(NAME, "v2"), staged(tmp_path / "partial", V2))
    monkeypatch.undo()
    assert store.get(NAME).model_id == "v2"
    assert tree_files(store.model_path(NAME)) == V2
    assert (store.versions_dir / previous).is_dir()
    assert recovered_version(root) == "v2"
    assert not (store.versions_dir / previous).exists()
