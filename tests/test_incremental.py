"""Growing state costs its growth (chunks, runs of long lists, big strings) and small saves are
batched in the background without ever losing the newest one; on memory://, a local directory
and S3 (moto's server on loopback)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint import segments
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import CheckpointSaveError
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.payloads import CHUNK
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.storage_options import storage_options
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import CheckpointStore

LOC = TaskLocation("GrowFlow", "3", "work", "9")


@pytest.fixture
def cp(root_url):
    return Checkpointer(CheckpointStore(root_url, storage_options(root_url)))


def chunks(artifact) -> set:
    return {digest for digest, _ in artifact.payloads()}


def text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghij klmnop") for _ in range(n))


def test_appending_to_a_list_writes_only_the_new_items(cp):
    """After the first save of a long list, each save that appends an item writes about that
    item (the tail and the manifest), never the list again, and loads back exactly."""
    rng = random.Random(1)
    results = [text(rng, 250) for _ in range(2000)]
    first = cp.save(LOC, 0, {"results": results, "i": 0})
    assert first.written > 500_000
    for i in range(1, 40):
        results.append(text(rng, 250))
        saved = cp.save(LOC, 0, {"results": results, "i": i})
        assert saved.written < 3 * segments.RUN_BYTES, (i, saved.written)
    assert cp.restore(cp.read(saved.key))["results"] == results
    assert len(chunks(saved) & chunks(first)) >= len(chunks(first)) - 2  # the old runs are reused


def test_a_changed_item_or_a_shorter_list_is_never_served_from_old_runs(cp):
    """Runs are reused only while the list still starts with the very same items: replacing,
    deleting or inserting an item anywhere is saved exactly."""
    rng = random.Random(2)
    items = [text(rng, 100) for _ in range(1000)] + list(range(500)) + [1.5, None, b"xy", True]
    for change in (lambda l: l.__setitem__(3, "changed"), lambda l: l.__delitem__(slice(-700, None)),
                   lambda l: l.insert(0, "first"), lambda l: l.extend(["a"] * 300), lambda l: l.reverse()):
        cp.save(LOC, 0, {"items": items})
        change(items)
        back = cp.restore(cp.read(cp.save(LOC, 0, {"items": items}).key))["items"]
        assert back == items and [type(x) for x in back] == [type(x) for x in items]


def test_lists_keep_their_identity_and_lists_of_objects_still_round_trip(cp):
    """A long list under two names, or also inside another attribute, comes back as one list;
    lists of dicts (not kept as runs) and nested lists round-trip as usual."""
    lst = [f"line {i}" for i in range(5000)]
    records = [{"id": i, "text": f"r{i}"} for i in range(3000)]
    back = cp.restore(cp.read(cp.save(LOC, 0, {"a": lst, "b": lst, "c": {"inner": lst}, "records": records}).key))
    assert back["a"] is back["b"] is back["c"]["inner"] and back["a"] == lst
    assert back["records"] == records


def test_the_first_save_after_load_writes_no_list_again(cp):
    """load() remembers the runs it rebuilt a list from: the next save of the same list with
    one more item writes only that growth."""
    rng = random.Random(3)
    log = [text(rng, 200) for _ in range(3000)]
    key = cp.save(LOC, 0, {"log": log}).key
    fresh = Checkpointer(CheckpointStore(cp.store.url, storage_options(cp.store.url)))
    restored = fresh.restore(fresh.read(key))["log"]
    restored.append("one more")
    saved = fresh.save(LOC, 1, {"log": restored})
    assert saved.written < 3 * segments.RUN_BYTES


def test_an_in_place_change_to_a_large_array_writes_only_the_touched_chunk(cp):
    """One float changed in a 40 MB array writes one chunk (and the manifest)."""
    w = np.random.default_rng(4).random(5_000_000)
    first = cp.save(LOC, 0, {"w": w})
    w[2_345_678] = -1.0
    second = cp.save(LOC, 0, {"w": w})
    assert CHUNK <= second.written < CHUNK + 20_000
    assert len(chunks(second) - chunks(first)) == 1
    assert np.array_equal(cp.restore(cp.read(second.key))["w"], w)


def test_text_appended_to_a_big_string_writes_its_last_chunk(cp):
    """A 6 MiB transcript with 1 KiB appended writes its last chunk, not the string."""
    rng = random.Random(5)
    transcript = rng.randbytes(3 << 20).hex()
    cp.save(LOC, 0, {"transcript": transcript, "n": 1})
    transcript += rng.randbytes(512).hex()
    saved = cp.save(LOC, 0, {"transcript": transcript, "n": 2})
    assert saved.written < CHUNK + 20_000
    assert cp.restore(cp.read(saved.key))["transcript"] == transcript


def test_equal_chunks_are_stored_once_across_attributes_and_runs(cp):
    """Two attributes holding equal arrays, and another run saving them again, add no chunk."""
    w = np.random.default_rng(6).random(1_000_000)
    first = cp.save(LOC, 0, {"a": w, "b": w.copy()})
    assert first.written < w.nbytes + 20_000  # b's chunks are a's
    other = cp.save(TaskLocation("GrowFlow", "4", "work", "12"), 0, {"c": w.copy()})
    assert other.written < 20_000 and set(other.field_payloads("c")) == set(first.field_payloads("a"))


# ----- batched small saves -------------------------------------------------------------------
class State:
    pass


def test_coalesced_saves_never_lose_the_last_one_before_wait(root_url):
    """A tight loop of small saves writes far fewer checkpoints than saves, each a state the
    loop really had, the newest being the last save; lineage has no gap."""
    obj = State()
    obj.results, obj.i = [], 0
    current = standalone(obj, root_url, LOC)
    for i in range(600):
        obj.results.append(f"item {i} " + "z" * 100)
        obj.i = i
        returned = current.save(metadata={"i": i})
        assert returned.written == 0  # returned before storage was touched
    current.wait()
    listed = current.list()
    assert 1 <= len(listed) < 600 and listed[0].metadata["i"] == 599
    keys = {a.key for a in listed}
    assert all(a.parent in keys for a in listed[:-1]) and listed[-1].parent is None
    for artifact in listed[:5]:
        values = current._checkpointer.restore(artifact)
        assert values["i"] == artifact.metadata["i"] and len(values["results"]) == values["i"] + 1


def test_save_wait_true_is_durable_on_return_and_flushes_earlier_saves(root_url):
    obj = State()
    obj.x = 1
    current = standalone(obj, root_url, LOC)
    current.save(name="early")
    obj.x = 2
    critical = current.save(wait=True)
    assert critical.written > 0 and critical.url
    names = [a.name for a in Checkpointer(current._checkpointer.store).list(LOC)]
    assert sorted(names) == ["early", "mfchckpt"]


def test_the_state_is_copied_at_save_even_when_the_step_changes_it_right_after(root_url):
    """A queued small save holds the state as it was at save(): arrays changed in place
    afterwards do not leak into it."""
    obj = State()
    obj.w = np.zeros(1000)
    current = standalone(obj, root_url, LOC)
    current.save(name="zeros")
    obj.w[:] = 7.0
    current.save(name="sevens")
    by_name = {a.name: a for a in current.wait()}
    store_cp = current._checkpointer
    assert not store_cp.restore(by_name["zeros"])["w"].any()
    assert (store_cp.restore(by_name["sevens"])["w"] == 7.0).all()


def test_a_background_failure_surfaces_at_the_next_call_naming_the_checkpoint(tmp_path):
    """A small save that fails in the writer thread is reported at the next wait(), naming
    it; the earlier checkpoint is untouched."""
    obj = State()
    obj.x = 1
    current = standalone(obj, str(tmp_path / "root"), LOC)
    good = current.save(wait=True)
    store = current._checkpointer.store

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    store.put_manifest = broken
    obj.x = 2
    failing = current.save()
    with pytest.raises(CheckpointSaveError, match=failing.key.rsplit("/", 1)[1]) as info:
        current.wait()
    assert "disk on fire" in str(info.value)
    del store.put_manifest
    assert current._checkpointer.restore(good)["x"] == 1


def test_saves_with_different_steps_are_never_superseded(root_url):
    """save(step=N) asks for each step to be kept: a tight loop of 30 steps writes all 30 (at
    most eight wait at a time), while a tight loop without steps is batched."""
    obj = State()
    current = standalone(obj, root_url, LOC)
    for i in range(30):
        obj.i = i
        current.save(step=i)
        assert current.pending <= 9  # eight waiting, one being written
    current.wait()
    assert sorted(a.step for a in current.list()) == list(range(30))


@pytest.mark.parametrize("how", ["deleted", "flipped", "truncated"])
def test_a_damaged_chunk_in_the_middle_of_an_array_is_named_and_load_falls_back(tmp_path, how):
    """One chunk of a 24 MB array damaged: an explicit load names the field and the chunk; the
    default resume warns and falls back to the previous checkpoint."""
    from pathlib import Path

    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import CheckpointCorrupt
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.recovery import restore_newest_intact

    cp = Checkpointer(CheckpointStore(str(tmp_path / "root")))
    older = cp.save(LOC, 0, {"w": np.random.default_rng(8).random(3_000_000)})
    newest = cp.save(LOC, 0, {"w": np.random.default_rng(9).random(3_000_000)})
    chunks_of_w = newest.field_payloads("w")
    assert len(chunks_of_w) == 12
    digest, size = chunks_of_w[5]
    path = Path(cp.store._object_path(LOC.flow, digest))
    data = path.read_bytes()
    if how == "deleted":
        path.unlink()
    else:
        path.write_bytes(data[: size // 2] if how == "truncated" else data[:100] + bytes([data[100] ^ 4]) + data[101:])
    with pytest.raises(CheckpointCorrupt, match=f"Field 'w' of checkpoint {newest.key} .*{digest}"):
        cp.load(newest.key)
    with pytest.warns(UserWarning, match=f"damaged checkpoint {newest.key}"):
        found, values = restore_newest_intact(cp, [newest, older])
    assert found.key == older.key and np.array_equal(values["w"], np.random.default_rng(8).random(3_000_000))
