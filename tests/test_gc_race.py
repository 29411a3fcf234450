"""gc and saves cannot race: a payload a save reuses is never deleted under it (gc.py).

The race is made deterministic, not hoped for: gc's progress callback runs a save at the worst
moment, after gc listed the storage and judged a payload old and unreferenced, just before it
deletes. The payload is made old (two hours) the way time would: on a local disk by setting its
mtime, on moto's S3 server (running in this process) by setting the object's LastModified.
"""
from __future__ import annotations

import os
import types
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint import gc, marks
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.storage_options import storage_options
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import EMPTY_DIGEST, CheckpointStore

from conftest import S3_BUCKET

LOC = TaskLocation("F", "1", "train", "1")
TWO_HOURS = timedelta(hours=2)


def fresh_store(root: str) -> CheckpointStore:
    """A store as another process would open it: knowing nothing."""
    return CheckpointStore(root, storage_options(root))


def payload_paths(store: CheckpointStore) -> list[str]:
    return [p for p in store.fs.find(store.flow_path("F")) if "/objects/" in p and EMPTY_DIGEST not in p]


def age(store: CheckpointStore, path: str) -> None:
    """Make a stored object two hours old."""
    if store.is_local:
        old = (datetime.now(timezone.utc) - TWO_HOURS).timestamp()
        os.utime(path, (old, old))
        return
    from moto.s3.models import s3_backends

    bucket, _, key = path.partition("/")
    for account in s3_backends.values():
        found = account["global"].buckets.get(bucket)
        if found is not None and key in found.keys:
            found.keys[key].last_modified = found.keys[key].last_modified - TWO_HOURS
            return
    raise AssertionError(f"{path} is not in moto's S3 server")


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "s3":
        request.getfixturevalue("s3_server")
        return f"s3://{S3_BUCKET}/race-{os.urandom(6).hex()}"
    return str(tmp_path / "ckpt")


def test_a_save_reusing_an_old_payload_while_gc_runs_never_loses_its_checkpoint(root):
    """An old, unreferenced payload that a save reuses between gc's listing and its deletes
    (default grace) is not deleted: the new checkpoint restores exactly, and the next gc with
    the default grace still keeps it."""
    weights = np.arange(100_000.0)  # one payload, well above the inline size
    flow = types.SimpleNamespace(w=weights)
    first = standalone(flow, root, LOC, async_saves=False)
    retired = first.save()
    store = first._checkpointer.store
    marks.retire(store, retired.key)  # nothing references the payload any more...
    marks.purge(store, LOC, [retired.key.rsplit("/", 1)[1]])
    (payload,) = payload_paths(store)
    age(store, payload)  # ...and it is two hours old: gc will judge it garbage

    saved = []

    def save_at_the_worst_moment(message: str) -> None:
        if message.strip().startswith("deleting") and not saved:
            other = standalone(types.SimpleNamespace(w=weights), root, TaskLocation("F", "2", "train", "1"),
                               async_saves=False)
            other._checkpointer.store.__dict__.update(fresh_store(root).__dict__)  # knows nothing
            saved.append(other.save())  # reuses the payload gc is about to delete

    report = gc.collect(fresh_store(root), "F", progress=save_at_the_worst_moment)
    assert saved, "gc never reached its deletes"
    assert (report.freed_payloads, report.reused_meanwhile) == (0, 1)
    reader = Checkpointer(fresh_store(root))
    assert np.array_equal(reader.restore(reader.read(saved[0].key))["w"], weights)
    gc.collect(fresh_store(root), "F")
    assert np.array_equal(Checkpointer(fresh_store(root)).restore(reader.read(saved[0].key))["w"], weights)


def test_payloads_known_to_exist_are_not_trusted_once_too_old_to_reuse(root):
    """What a task knows to exist expires with the reuse window: a payload that aged past it
    (by the storage's clock) is checked again and written again, not referenced blindly."""
    weights = np.arange(100_000.0)
    api = standalone(types.SimpleNamespace(w=weights), root, LOC, async_saves=False)
    api.save()
    store = api._checkpointer.store
    (payload,) = payload_paths(store)
    digest = payload.rsplit("/", 1)[1]
    store._known[digest] -= TWO_HOURS.total_seconds()  # what this task learnt two hours ago
    age(store, payload)
    assert api.save().written > 0 or store.is_local  # object stores: written again
    if store.is_local:
        assert store.now("F") - os.stat(payload).st_mtime < 60  # local: freshened in place


GC_AHEAD = """
import sys
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint import gc
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import CheckpointStore
report = gc.collect(CheckpointStore(sys.argv[1]), "F")
print(report.freed_payloads, report.young_unreferenced)
"""


def test_a_gc_host_whose_clock_runs_ahead_deletes_nothing_young(tmp_path):
    """gc on a host whose clock is 2 hours ahead (libfaketime) ages objects by the storage's
    clock: a payload unreferenced for a minute is young, kept, and reported so."""
    import subprocess
    import sys

    from test_clock_skew import LIBFAKETIME

    if not LIBFAKETIME.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("libfaketime is missing: .ci/run installs the Debian package faketime")
        pytest.skip("libfaketime is not installed (apt-get install faketime)")
    root = str(tmp_path / "ckpt")
    api = standalone(types.SimpleNamespace(w=np.arange(100_000.0)), root, LOC, async_saves=False)
    saved = api.save()
    store = api._checkpointer.store
    marks.retire(store, saved.key)
    marks.purge(store, LOC, [saved.key.rsplit("/", 1)[1]])  # the payload is unreferenced, and young
    env = {**os.environ, "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": "+2h"}
    proc = subprocess.run([sys.executable, "-c", GC_AHEAD, root], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["0", "1"] and len(payload_paths(store)) == 1


def test_a_temporary_file_deleted_under_a_save_says_so(tmp_path, monkeypatch):
    """A local write whose temporary file vanished before its rename (`gc --grace 0` running
    meanwhile) fails naming what happened, not "the bucket or folder does not exist"."""
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import CheckpointError

    api = standalone(types.SimpleNamespace(w=np.arange(100_000.0)), str(tmp_path / "ckpt"), LOC, async_saves=False)
    api.save()  # the root exists; the next save's payload write is the one to lose its temporary file
    store = api._checkpointer.store
    real_mv = store.fs.mv

    def gc_first(src, dst, **kwargs):  # the fault: gc removes the temporary file just before the rename
        if src.endswith(".tmp"):
            os.unlink(src)
        return real_mv(src, dst, **kwargs)

    monkeypatch.setattr(store.fs, "mv", gc_first)  # (fsspec shares the instance: undone after the test)
    api._ctx.flow.w = np.arange(100_000.0) + 1
    with pytest.raises(CheckpointError) as caught:
        api.save()
    assert "vanished before it was renamed into place" in str(caught.value)
    assert "gc --grace 0" in str(caught.value) and "does not exist" not in str(caught.value)


def test_gc_removes_temporary_files_only_past_the_grace_and_says_so(tmp_path):
    """A temporary file of an unfinished write is kept by gc with the default grace, and removed
    with a progress line naming what it is once past the grace."""
    root = str(tmp_path / "ckpt")
    api = standalone(types.SimpleNamespace(w=np.arange(100_000.0)), root, LOC, async_saves=False)
    api.save()
    (payload,) = payload_paths(api._checkpointer.store)
    tmp = f"{payload}.0123.tmp"
    with open(tmp, "wb") as f:
        f.write(b"half a payload")
    said = []
    gc.collect(fresh_store(root), "F", progress=said.append)
    assert os.path.exists(tmp)
    gc.collect(fresh_store(root), "F", grace=0, progress=said.append)
    assert not os.path.exists(tmp)
    assert any("temporary files of writes unfinished for longer than the grace" in line for line in said)
