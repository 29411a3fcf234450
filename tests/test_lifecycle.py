"""Retention, pins, two-phase deletion and gc in the Metaflow-free core, on memory:// and a
local directory."""
from __future__ import annotations

import json
import math
import os
import threading
import time
import types

import numpy as np
import pytest

from faults import FaultyFileSystem
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint import gc, marks
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import (
    CheckpointConfigError,
    CheckpointError,
    CheckpointNotFound,
    CheckpointPinned,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.lineage import lineage
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation, parse_key
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.retention import parse_keep
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.storage_options import storage_options
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import EMPTY_DIGEST, CheckpointStore

LOC = TaskLocation("F", "1", "train", "2")
KEEP = {"last": 3, "best": ("loss", "min", 2)}


def attempt_api(root, attempt, keep=KEEP, loc=LOC, async_saves=False):
    flow = types.SimpleNamespace()
    return flow, standalone(flow, root, loc, attempt, async_saves=async_saves, keep=keep)


def payload_digests(store: CheckpointStore, flow: str = "F") -> set[str]:
    return {p.rsplit("/", 1)[1] for p in store.fs.find(store.flow_path(flow)) if "/objects/" in p and EMPTY_DIGEST not in p}


def loss_of(i: int):
    """Save i's metadata: rising losses except the two best (5 and 57); some saves lack the
    metric, one has NaN."""
    if i % 10 == 3:
        return {"i": i}
    return {"i": i, "loss": {5: 0.1, 57: 0.2, 7: math.nan}.get(i, 1.0 + i / 1000)}


def test_retention_over_100_saves_keeps_exactly_the_promised_set(root_url):
    """100 saves over three attempts with keep={'last': 3, 'best': ('loss', 'min', 2)}: kept are
    the newest 3, the 2 lowest losses, the 2 pinned, and the checkpoints attempts resumed from
    (with their resume spine); lineage of the newest still reaches attempt 0."""
    i = 0
    for attempt, count in ((0, 40), (1, 30), (2, 30)):
        flow, api = attempt_api(root_url, attempt)
        if attempt:
            assert api.load().metadata["i"] == i - 1  # the newest of the earlier attempt
        for _ in range(count):
            flow.i, flow.w = i, np.full(1000, float(i))  # 8 KB: a payload of its own
            saved = api.save(metadata=loss_of(i), pin=i in (20, 88))
            assert api.list()[0].key == saved.key  # the newest committed is always kept
            i += 1
    kept = api.list()
    assert sorted(c.metadata["i"] for c in kept) == [5, 20, 39, 57, 69, 88, 97, 98, 99]
    assert sorted(c.metadata["i"] for c in kept if c.pinned) == [20, 88]
    retired = marks.marker_ids(api._checkpointer.store, LOC, marks.RETIRED)
    assert len(retired) == 91 and not retired & {c.key.rsplit("/", 1)[1] for c in kept}
    assert [c.metadata["i"] for c in lineage(api._checkpointer, kept[0].key)] == [39, 69, 97, 98, 99]


def test_a_retired_checkpoint_still_loads_until_purged(root_url):
    """Two-phase deletion: a reader that listed a checkpoint before retention retired it can
    still load it (gc with the default grace purges nothing); once purged, loading says so."""
    flow, api = attempt_api(root_url, 0, keep={"last": 1})
    flow.w = np.arange(2000.0)
    listed = api.save()
    flow.w = flow.w + 1
    api.save()
    assert [c.key for c in api.list()] != [listed.key] and len(api.list()) == 1  # retired
    reader = Checkpointer(CheckpointStore(root_url, storage_options(root_url)))
    assert gc.collect(reader.store, "F").purged == 0
    np.testing.assert_array_equal(reader.restore(listed)["w"], np.arange(2000.0))
    assert gc.collect(reader.store, "F", grace=0).purged == 1
    with pytest.raises(CheckpointNotFound, match=f"No checkpoint {listed.key}"):
        reader.restore(listed)


def test_retention_purges_tombstones_older_than_the_grace_period(tmp_path):
    """The next attempt's retention removes a manifest retired more than an hour ago, and its
    tombstone, but not ones retired a moment ago (however old the checkpoint)."""
    flow, api = attempt_api(str(tmp_path), 0, keep={"last": 1})
    keys = []
    for n in range(2):
        flow.n = n
        keys.append(api.save().key)
    store = api._checkpointer.store
    old_id = "20200101T000000000000Z-a0-0123abcd"  # a checkpoint from long ago, retired long ago
    just_retired = "20200101T000000000000Z-a0-4567cdef"  # one from long ago, retired just now
    for checkpoint_id in (old_id, just_retired):
        store.put_manifest(LOC, checkpoint_id, store.get_manifest(*parse_key(keys[0])))
        marks.put_marker(store, LOC, marks.RETIRED, checkpoint_id)
    folder = store.task_path(LOC)
    os.utime(f"{folder}/retired/{old_id}", (time.time() - 3700, time.time() - 3700))
    flow, retry = attempt_api(str(tmp_path), 1, keep={"last": 1})
    flow.n = 2
    retry.save()
    assert not os.path.exists(f"{folder}/retired/{old_id}") and not os.path.exists(f"{folder}/{old_id}.json")
    for recent in (parse_key(keys[0])[1], just_retired):  # retired a moment ago: still there
        assert os.path.exists(f"{folder}/{recent}.json") and os.path.exists(f"{folder}/retired/{recent}")


def test_a_pin_set_between_saves_is_honoured(root_url):
    """A checkpoint pinned from outside the task (the CLI) after retention last looked is not
    retired by the next save."""
    flow, api = attempt_api(root_url, 0, keep={"last": 1})
    flow.n = 0
    first = api.save()
    marks.pin(api._checkpointer.store, first.key)
    flow.n = 1
    second = api.save()
    assert [(c.key, c.pinned) for c in api.list()] == [(second.key, False), (first.key, True)]


def test_the_checkpoint_a_retry_would_resume_from_is_kept(root_url):
    """With keep={'last': 1}, a newer latest=False save does not cost the next attempt its
    resume point."""
    flow, api = attempt_api(root_url, 0, keep={"last": 1})
    flow.n = 1
    resumable = api.save()
    flow.n = 2
    api.save(latest=False)
    assert len(api.list()) == 2
    _, retry = attempt_api(root_url, 1, keep={"last": 1})
    assert retry.load().key == resumable.key


def three_saves(root):
    flow, first = attempt_api(root, 0, keep=None)
    for n in range(3):
        flow.n = n
        first.save()
    return first.list()


def test_the_checkpoint_an_earlier_attempt_loaded_is_kept(root_url):
    """keep={'last': 1}: the checkpoint attempt 1 loaded survives its retention passes, and
    still does once attempt 2, which loaded nothing, saves."""
    loaded = three_saves(root_url)[0]
    flow, second = attempt_api(root_url, 1, keep={"last": 1})
    assert second.load().key == loaded.key
    flow.n = 10
    newest = second.save()
    assert {c.key for c in second.list()} == {loaded.key, newest.key}
    _, third = attempt_api(root_url, 2, keep={"last": 1})
    latest = third.save()
    assert {c.key for c in third.list()} == {loaded.key, latest.key}


def test_the_checkpoint_the_running_attempt_loaded_is_kept(tmp_path):
    """keep={'last': 1}: a checkpoint loaded after a background save was captured (so nothing
    committed descends from it yet) is kept when that save settles; the rest is retired."""
    older = three_saves(str(tmp_path))[1]
    flow, api = attempt_api(str(tmp_path), 1, keep={"last": 1}, async_saves=True)
    flow.w = np.ones(2 << 20)  # 16 MB: a background save, captured before the load below
    pending = api.save()
    api.load(older)  # retention runs when the pending save settles, after this load
    api.wait()
    assert {c.key for c in api.list()} == {pending.key, older.key}


def test_retention_counts_only_committed_saves(tmp_path, monkeypatch):
    """A save still being written in the background is neither counted nor touched: with
    keep={'last': 2}, the older checkpoint survives until the pending one commits."""
    monkeypatch.setattr(FaultyFileSystem, "write_delay", 0.0)
    root = f"faultyfile://{tmp_path}/root"
    flow, api = attempt_api(root, 0, keep={"last": 2}, async_saves=True)
    flow.n, flow.w = 0, np.zeros(10)
    first = api.save(wait=True)
    monkeypatch.setattr(FaultyFileSystem, "write_delay", 0.5)
    flow.w = np.ones(2 << 20)  # 16 MB: written in the background (forked), slowly
    pending = api.save()
    flow.w = np.zeros(10)
    monkeypatch.setattr(FaultyFileSystem, "write_delay", 0.0)
    third = api.save()  # small: written by the writer thread, at once
    deadline = time.monotonic() + 20
    while third.key not in [c.key for c in api.list()] and time.monotonic() < deadline:
        pass  # list() settles what the writer thread committed (and applies retention)
    assert api.pending == 1
    assert [c.key for c in api.list()] == [third.key, first.key]
    api.wait()
    assert [c.key for c in api.list()] == [third.key, pending.key]


def test_a_failed_retention_keeps_the_save_and_is_retried(tmp_path, monkeypatch, capsys):
    """When tombstones cannot be written, the save still succeeds, stderr says what happened,
    and the next save retires what the failed one could not."""
    monkeypatch.setattr(FaultyFileSystem, "write_delay", 0.0)
    monkeypatch.setattr(FaultyFileSystem, "fail_paths", ())
    flow, api = attempt_api(f"faultyfile://{tmp_path}/root", 0, keep={"last": 1})
    flow.n = 0
    api.save()
    monkeypatch.setattr(FaultyFileSystem, "fail_paths", ("/retired/",))
    flow.n = 1
    api.save()
    assert len(api.list()) == 2
    err = capsys.readouterr().err
    assert "could not delete old checkpoints (Could not write faultyfile://" in err
    assert "injected write failure" in err
    monkeypatch.setattr(FaultyFileSystem, "fail_paths", ())
    flow.n = 2
    newest = api.save()
    assert [c.key for c in api.list()] == [newest.key]


def test_a_background_save_is_pinned_right_after_its_commit(tmp_path):
    """save(pin=True) of a large state written in the background is pinned once durable, and
    retention (keep={'last': 1}) keeps it among newer saves."""
    flow, api = attempt_api(str(tmp_path), 0, keep={"last": 1}, async_saves=True)
    flow.w = np.ones(2 << 20)  # 16 MB: written by the background writer, which also pins it
    pending = api.save(pin=True)
    assert pending.pinned
    (stored,) = api.wait()
    flow.w = np.zeros(10)
    newest = api.save(wait=True)
    assert stored.pinned and [(c.key, c.pinned) for c in api.list()] == [(newest.key, False), (pending.key, True)]


def test_pins_are_markers_and_a_pin_refuses_deletion(root_url):
    """Pinning never rewrites the manifest; a pinned checkpoint cannot be retired; unpinned it
    can. The manifest stores resumed_from but neither pinned nor url."""
    flow, api = attempt_api(root_url, 0, keep=None)
    flow.n = 1
    artifact = api.save(pin=True)
    store = api._checkpointer.store
    loc, checkpoint_id = parse_key(artifact.key)
    manifest = store.get_manifest(loc, checkpoint_id)
    head = json.loads(manifest.split(b"\n")[0])
    assert "pinned" not in head and "url" not in head and head["resumed_from"] is None
    assert artifact.pinned and api.list()[0].pinned
    with pytest.raises(CheckpointPinned, match="unpin it first"):
        marks.retire(store, artifact.key)
    marks.unpin(store, artifact.key)
    assert not api.list()[0].pinned and store.get_manifest(loc, checkpoint_id) == manifest
    assert marks.retire(store, artifact.key) is True and marks.retire(store, artifact.key) is False
    assert api.list() == []
    with pytest.raises(CheckpointNotFound, match="was deleted"):
        marks.pin(store, artifact.key)


@pytest.mark.parametrize("purger", ["retention", "gc"])
def test_a_pin_that_raced_a_retirement_wins(root_url, purger):
    """A checkpoint pinned while it was being retired is un-retired, not purged, by both
    retention's purge and gc's."""
    flow, api = attempt_api(root_url, 0, keep=None)
    flow.w = np.arange(1000.0)
    raced = api.save()
    store = api._checkpointer.store
    loc, checkpoint_id = parse_key(raced.key)
    marks.retire(store, raced.key)
    marks.put_marker(store, loc, marks.PINS, checkpoint_id)  # pin() itself refuses retired ones
    if purger == "gc":
        gc.collect(store, "F", grace=0)
    else:
        marks.purge(store, loc, [checkpoint_id])
    assert [(c.key, c.pinned) for c in api.list()] == [(raced.key, True)]
    np.testing.assert_array_equal(api._checkpointer.restore(raced)["w"], np.arange(1000.0))


def test_eager_resume_skips_deleted_runs(root_url):
    """A checkpoint of a deleted run is never resumed from by another run."""
    flow, api = attempt_api(root_url, 0, keep=None)
    flow.n = 1
    old = api.save()
    flow.n = 2
    newer = api.save()
    cp = api._checkpointer
    rerun = TaskLocation("F", "9", "train", "5")
    assert cp.find_resumable(rerun, 0, other_runs=True, namespace=None).key == newer.key
    marks.retire(cp.store, newer.key)
    assert cp.find_resumable(rerun, 0, other_runs=True, namespace=None).key == old.key


def three_runs(root):
    """Three runs sharing one payload (`shared`), each with payloads of its own."""
    shared = np.arange(5000.0)
    apis = []
    for run in ("1", "2", "3"):
        flow, api = attempt_api(root, 0, keep=None, loc=TaskLocation("F", run, "train", "7"))
        flow.shared = shared
        for n in range(3):
            flow.own = np.full(1000, float(int(run) * 10 + n))
            flow.small = n  # inline: no payload object
            api.save()
        apis.append(api)
    return apis


def test_gc_after_deleting_runs_frees_exactly_the_unreachable_payloads(root_url):
    """Deleting runs 1 and 2 then gc (grace 0) purges their 6 manifests and deletes exactly
    their own payloads; the shared payload and run 3's stay; the report adds up."""
    apis = three_runs(root_url)
    store = apis[0]._checkpointer.store
    before = payload_digests(store)
    kept = apis[2].list()
    reachable = {digest for c in kept for digest, size in c.payloads() if size > 4096}
    for api in apis[:2]:
        for c in api.list():
            marks.retire(store, c.key)
    report = gc.collect(store, "F", grace=0)
    assert payload_digests(store) == reachable and len(before) == 10 and len(reachable) == 4
    assert (report.purged, report.checkpoints, report.freed_payloads) == (6, 3, 6)
    assert report.logical_bytes == sum(c.size for c in kept)
    assert report.physical_bytes - report.freed_bytes == sum(
        store.fs.size(f"{store.flow_path('F')}/objects/{d[:2]}/{d}") for d in reachable
    )
    assert apis[2].load(kept[-1]).key == kept[-1].key


def test_loads_of_kept_checkpoints_survive_a_concurrent_gc(root_url):
    """While gc deletes hundreds of unreachable payloads, loads of a kept checkpoint, from
    another thread and between gc's delete batches, all succeed."""
    apis = three_runs(root_url)
    store = apis[0]._checkpointer.store
    flow, doomed = attempt_api(root_url, 0, keep=None, loc=TaskLocation("F", "4", "train", "1"))
    for n in range(300):
        flow.own = np.full(600, float(n))
        doomed.save()
    for c in doomed.list():
        marks.retire(store, c.key)
    kept, other = apis[2].list()[0], apis[0].list()[0]
    reader = Checkpointer(CheckpointStore(root_url, storage_options(root_url)))
    loads, errors, done = [], [], threading.Event()

    def load_until_done():
        while not done.is_set():
            try:
                loads.append(reader.restore(kept)["own"][0])
            except CheckpointError as exc:
                errors.append(exc)

    thread = threading.Thread(target=load_until_done)
    thread.start()
    between = []  # memory:// gives concurrent readers of one object the same file: read another

    def load_between(message):
        between.append(reader.restore(other, fields=["own"])["own"][0])

    report = gc.collect(store, "F", grace=0, progress=load_between)
    done.set()
    thread.join()
    assert report.freed_payloads == 300 and not errors and loads and between
    assert set(loads) == {32.0} and set(between) == {12.0}


def test_gc_with_the_default_grace_deletes_nothing_young(root_url):
    """Right after a run is deleted and while a save has written its payload but not yet its
    manifest, gc with the default grace (1 h) purges and deletes nothing, and reports the young
    unreferenced payload it kept; grace 0 would delete it."""
    apis = three_runs(root_url)
    store = apis[0]._checkpointer.store
    for c in apis[0].list():
        marks.retire(store, c.key)
    store.put_object("F", "ab" * 16, [b"a payload whose manifest is not written yet"])
    objects = set(store.fs.find(store.flow_path("F")))
    report = gc.collect(store, "F")
    assert (report.purged, report.freed_payloads, report.young_unreferenced) == (0, 0, 1)
    assert report.retired_waiting == 3 and set(store.fs.find(store.flow_path("F"))) == objects
    assert gc.collect(store, "F", grace=0, dry_run=True).freed_payloads == 4


def test_gc_dry_run_changes_nothing_and_predicts_the_real_run(root_url):
    """--dry-run reports what a real gc then frees, and leaves every object in place."""
    apis = three_runs(root_url)
    store = apis[0]._checkpointer.store
    for c in apis[1].list():
        marks.retire(store, c.key)
    objects = set(store.fs.find(store.flow_path("F")))
    dry = gc.collect(store, "F", grace=0, dry_run=True)
    assert set(store.fs.find(store.flow_path("F"))) == objects
    real = gc.collect(store, "F", grace=0)
    assert (dry.purged, dry.freed_payloads, dry.freed_bytes) == (real.purged, real.freed_payloads, real.freed_bytes)
    assert real.freed_payloads == 3 and set(store.fs.find(store.flow_path("F"))) < objects


def test_gc_stops_before_deleting_anything_at_an_unreadable_manifest(root_url):
    """A manifest gc cannot read stops it with a message naming the file, nothing deleted."""
    apis = three_runs(root_url)
    store = apis[0]._checkpointer.store
    for c in apis[0].list():
        marks.retire(store, c.key)
    bad = f"{store.task_path(TaskLocation('F', '5', 'train', '1'))}/20260101T000000000000Z-a0-0123abcd.json"
    store.fs.makedirs(bad.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(bad, b"{not json")
    objects = set(store.fs.find(store.flow_path("F")))
    with pytest.raises(CheckpointError, match="gc stopped before deleting anything.*0123abcd.json"):
        gc.collect(store, "F", grace=0)
    assert set(store.fs.find(store.flow_path("F"))) == objects


def test_lineage_warns_where_a_resumed_from_checkpoint_was_deleted(root_url):
    """When the checkpoint an attempt resumed from is gone, lineage stops there with a warning."""
    flow, first = attempt_api(root_url, 0, keep=None)
    flow.n = 0
    origin = first.save()
    _, second = attempt_api(root_url, 1, keep=None)
    second.load()
    flow.n = 1
    newest = second.save()
    marks.retire(second._checkpointer.store, origin.key)
    with pytest.warns(UserWarning, match=f"stops at {origin.key}"):
        assert [c.key for c in lineage(second._checkpointer, newest.key)] == [newest.key]


@pytest.mark.parametrize("keep, message", [
    ({"lst": 3}, r"unknown key\(s\) \['lst'\]"),
    ({"last": 0}, r"keep\['last'\]=0 must be a whole number"),
    ({"last": True}, r"keep\['last'\]=True"),
    ({"best": ("loss", "lowest", 2)}, r"keep\['best'\]=.* must be \(metadata key, 'min' or 'max', how many\)"),
    ({"best": ("loss", 2)}, r"keep\['best'\]"),
    ({}, r"must be a dict such as"),
    (3, r"keep=3 must be a dict"),
])
def test_bad_keep_forms_are_refused_with_the_expected_form(keep, message):
    """Each malformed keep= says what is wrong and shows the valid form."""
    with pytest.raises(CheckpointConfigError, match=message):
        parse_keep(keep)


def test_keep_accepts_lists_for_best():
    """best given as a list (as JSON or a Config would give it) is the same policy."""
    assert parse_keep({"best": ["acc", "max", 1]}) == parse_keep({"best": ("acc", "max", 1)})
