"""The Metaflow-free core (snapshot, store, manifest, checkpointer, lineage) on memory://, a
local directory and S3 (moto's server on loopback, reached with Metaflow's S3 settings)."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import (
    CheckpointCorrupt,
    CheckpointFormatError,
    CheckpointNotFound,
    CheckpointSaveError,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.lineage import lineage
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import (
    CheckpointArtifact,
    TaskLocation,
    parse_key,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.snapshot import select_state
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.storage_options import storage_options
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import (
    EMPTY_DIGEST,
    INLINE_MAX,
    CheckpointStore,
)


LOC = TaskLocation("TrainFlow", "17", "train", "4")


@pytest.fixture
def cp(root_url):
    return Checkpointer(CheckpointStore(root_url, storage_options(root_url)))


def object_paths(cp):
    """Payload objects, without the empty one the first save writes to check the root is writable."""
    return [p for p in cp.store.fs.find(cp.store.root) if "/objects/" in p and EMPTY_DIGEST not in p]


def test_save_then_restore_returns_equal_values(cp):
    """save then restore gives back every value, numpy arrays included."""
    state = {"epoch": 3, "w": np.arange(5.0), "hist": {"loss": [0.5, 0.25]}}
    artifact = cp.save(LOC, 0, state)
    back = cp.restore(cp.read(artifact.key))
    assert back["epoch"] == 3 and back["hist"] == state["hist"]
    np.testing.assert_array_equal(back["w"], state["w"])


def test_closures_lambdas_and_local_classes_round_trip(cp):
    """cloudpickle carries lambdas, closures and classes defined in a function."""

    class Local:
        def __init__(self, v):
            self.v = v

    k = 10
    state = {"f": lambda x: x + k, "obj": Local(4), "cls": Local}
    back = cp.restore(cp.read(cp.save(LOC, 0, state).key))
    assert back["f"](1) == 11 and back["obj"].v == 4 and back["cls"](2).v == 2


def test_unchanged_state_writes_only_a_new_manifest(cp):
    """Saving the same state twice writes no payload the second time: only its manifest."""
    state = {"big": np.random.default_rng(71).random(1_000_000), "n": 1}  # no two chunks alike
    first = cp.save(LOC, 0, state)
    before = set(object_paths(cp))
    second = cp.save(LOC, 0, state)
    assert first.written >= 8_000_000 and second.written == len(cp.store.fs.cat_file(second.url)) < INLINE_MAX
    assert set(object_paths(cp)) == before
    assert first.key != second.key and second.size == first.size


def test_only_the_changed_attribute_is_written(cp):
    """Changing one attribute among several writes that attribute's buffer alone (and the manifest)."""
    state = {"a": np.ones(100_000), "b": np.zeros(100_000)}
    cp.save(LOC, 0, state)
    state["b"] = state["b"] + 2
    second = cp.save(LOC, 0, state)
    assert second.written - len(cp.store.fs.cat_file(second.url)) == 800_000


def test_payloads_are_shared_across_runs(cp):
    """Two runs of the same flow saving the same value store one payload."""
    cp.save(LOC, 0, {"x": np.ones(1000)})
    other = cp.save(TaskLocation("TrainFlow", "18", "train", "9"), 0, {"x": np.ones(1000)})
    assert other.written < INLINE_MAX and len(object_paths(cp)) == 1


def test_list_is_newest_first_with_filters(cp):
    """list() orders by creation time over attempts; attempt= and name= filter."""
    keys = [cp.save(LOC, a, {"i": a}, name="odd" if a % 2 else "even").key for a in (0, 0, 1, 2)]
    listed = cp.list(LOC)
    assert [a.key for a in listed] == keys[::-1]
    assert [a.created_on for a in listed] == sorted((a.created_on for a in listed), reverse=True)
    assert [a.key for a in cp.list(LOC, attempt=0)] == keys[:2][::-1]
    assert [a.key for a in cp.list(LOC, name="odd")] == [keys[2]]
    assert cp.list(TaskLocation("TrainFlow", "17", "train", "5")) == []


def test_created_on_has_fixed_width_and_sorts_like_time(cp):
    """created_on is ISO-8601 UTC with microseconds and Z, and string order is time order."""
    stamps = [cp.save(LOC, 0, {"i": i}).created_on for i in range(20)]
    assert all(len(s) == 27 and s.endswith("Z") and s[10] == "T" for s in stamps)
    assert stamps == sorted(stamps) and len(set(stamps)) == 20


def test_inspect_works_without_payloads(cp):
    """A manifest alone describes a checkpoint: fields, types and sizes survive deleted payloads."""
    artifact = cp.save(LOC, 0, {"w": np.zeros(10_000, dtype=np.float32), "epoch": 2})
    for path in object_paths(cp):
        cp.store.fs.rm_file(path)
    fields = cp.read(artifact.key).implicit_manifest["fields"]
    assert fields["w"]["type"] == "numpy.ndarray" and fields["epoch"]["type"] == "int"
    assert fields["w"]["size"] > 40_000
    with pytest.raises(CheckpointCorrupt, match=r"Field 'w' of checkpoint .*missing its payload"):
        cp.restore(cp.read(artifact.key))


def test_tampered_payload_fails_its_hash(cp):
    """restore verifies each payload against its hash and names the field and checkpoint."""
    artifact = cp.save(LOC, 0, {"w": np.arange(10_000.0)})
    (path,) = object_paths(cp)
    data = bytearray(cp.store.fs.cat_file(path))
    data[-1] ^= 0xFF
    cp.store.fs.pipe_file(path, bytes(data))
    with pytest.raises(CheckpointCorrupt, match=rf"Field 'w' of checkpoint {artifact.key} does not match its hash"):
        cp.restore(cp.read(artifact.key))


def test_missing_checkpoint_is_an_error(cp):
    """Reading a key that names no checkpoint raises CheckpointNotFound naming it."""
    key = LOC.key("20260101T000000000000Z-a0-0123abcd")
    with pytest.raises(CheckpointNotFound, match=f"No checkpoint {key}"):
        cp.read(key)


@pytest.mark.parametrize("bad", ["", "a/b", "..", "x" * 129, "tab\there", 7])
def test_bad_names_are_refused_before_anything_is_written(cp, bad):
    """An invalid checkpoint name raises, says what is allowed, and writes nothing."""
    with pytest.raises(CheckpointSaveError, match="Invalid checkpoint name"):
        cp.save(LOC, 0, {"x": np.ones(10)}, name=bad)
    assert object_paths(cp) == [] and cp.list(LOC) == []


def test_metadata_must_be_json(cp):
    """Metadata that is not JSON names the offending key; the user's dict comes back as given."""
    with pytest.raises(CheckpointSaveError, match="value of key 'model' is not JSON-serializable"):
        cp.save(LOC, 0, {"x": 1}, metadata={"loss": 0.1, "model": object()})
    artifact = cp.save(LOC, 0, {"x": 1}, metadata={"loss": 0.1, "tags": ["a"]})
    assert cp.read(artifact.key).metadata == {"loss": 0.1, "tags": ["a"]}


def test_unserializable_attribute_names_it_and_keeps_earlier_checkpoints(cp):
    """A lock fails the save naming the attribute and suggesting exclude=; the previous
    checkpoint still loads."""
    good = cp.save(LOC, 0, {"n": 1})
    with pytest.raises(CheckpointSaveError, match=r"self\.lock .*exclude=\['lock'\]"):
        cp.save(LOC, 0, {"n": 2, "lock": threading.Lock()}, where="step 'train'")
    assert [a.key for a in cp.list(LOC)] == [good.key]
    assert cp.restore(cp.read(good.key)) == {"n": 1}


def test_newer_format_asks_for_an_upgrade(cp):
    """A manifest from a future format version gives an 'upgrade' error."""
    artifact = cp.save(LOC, 0, {"n": 1})
    head, _, rest = cp.store.fs.cat_file(artifact.url).partition(b"\n")
    body = json.loads(head)
    body["version"] = 99
    cp.store.fs.pipe_file(artifact.url, json.dumps(body).encode() + b"\n" + rest)
    with pytest.raises(CheckpointFormatError, match="Upgrade metaflow-implicit-checkpoint"):
        cp.read(artifact.key)


def test_malformed_keys_are_refused():
    """A string that is not a checkpoint key is rejected with the expected shape."""
    for bad in ["", "Flow/1/step", "Flow/1/step/2/root/not-an-id", None]:
        with pytest.raises(CheckpointFormatError, match="is not a checkpoint key"):
            parse_key(bad)


def test_artifact_dict_round_trip(cp):
    """to_dict/from_dict round-trip; the key embeds the task pathspec."""
    artifact = cp.save(LOC, 2, {"n": 1}, name="best", metadata={"loss": 1.5})
    assert CheckpointArtifact.from_dict(artifact.to_dict()) == artifact
    assert artifact.key.startswith(LOC.pathspec + "/root/")
    assert artifact.attempt == 2 and artifact.url.endswith(".json")
    assert json.loads(json.dumps(artifact.to_dict())) == artifact.to_dict()


def test_lineage_follows_parents_oldest_first(cp):
    """lineage(key) returns ancestors oldest first and the checkpoint itself last."""
    a = cp.save(LOC, 0, {"i": 0})
    b = cp.save(LOC, 1, {"i": 1}, parent=a.key)
    c = cp.save(LOC, 2, {"i": 2}, parent=b.key)
    assert [x.key for x in lineage(cp, c.key)] == [a.key, b.key, c.key]
    assert [x.key for x in lineage(cp, a.key)] == [a.key]


def test_find_resumable_fresh_and_eager(cp):
    """fresh: newest `latest` checkpoint of earlier attempts only; eager: else another run's
    at the same position and namespace."""
    first = cp.save(LOC, 0, {"i": 0}, namespace="user:a")
    cp.save(LOC, 1, {"i": 1}, latest=False, namespace="user:a")
    assert cp.find_resumable(LOC, 2, other_runs=False, namespace="user:a").key == first.key
    assert cp.find_resumable(LOC, 0, other_runs=False, namespace="user:a") is None

    rerun = TaskLocation("TrainFlow", "99", "train", "1")
    assert cp.find_resumable(rerun, 0, other_runs=False, namespace="user:a") is None
    assert cp.find_resumable(rerun, 0, other_runs=True, namespace="user:a").key == first.key
    assert cp.find_resumable(rerun, 0, other_runs=True, namespace="user:b") is None
    shard = TaskLocation("TrainFlow", "99", "train", "2", position="3")
    assert cp.find_resumable(shard, 0, other_runs=True, namespace="user:a") is None


def test_select_state_rules():
    """Public non-method attributes, minus reserved names; include/exclude apply."""

    class Obj:
        def method(self):
            pass

    o = Obj()
    attrs = {"a": 1, "_private": 2, "name": "Flow", "m": o.method, "f": len, "alpha": 0.1}
    assert list(select_state(attrs, reserved={"name", "alpha"})) == ["a", "f"]
    assert list(select_state(attrs, reserved={"name"}, exclude=["f"])) == ["a", "alpha"]
    assert list(select_state(attrs, include=["alpha"])) == ["alpha"]
    with pytest.raises(CheckpointSaveError, match="include=.* names 'epoch', which is not set on self"):
        select_state(attrs, include=["a", "epoch"], where="step 'train'")


def test_foreach_position_is_stable():
    """Positions are 'root' outside a foreach and dotted branch indices inside."""
    assert TaskLocation.position_of(None) == "root"
    assert TaskLocation.position_of([(2, 4, "c")]) == "2"
    assert TaskLocation.position_of([(0, 3, "a"), (1, 4, "e")]) == "0.1"


def test_small_attributes_live_in_the_manifest(cp):
    """A save of small attributes writes one object (the manifest) and restores exactly."""
    state = {f"a{i}": {"i": i, "xs": list(range(i))} for i in range(20)}
    artifact = cp.save(LOC, 0, state)
    assert object_paths(cp) == [] and artifact.written == len(cp.store.fs.cat_file(artifact.url))
    assert all(f["size"] <= INLINE_MAX for f in artifact.implicit_manifest["fields"].values())
    assert cp.restore(artifact) == state


def test_tampered_inline_payload_fails_its_hash(cp):
    """Inline payloads are verified like stored ones: an edit that even keeps the manifest's
    seal valid (re-sealed, as anyone can without a secret) fails the field's hash."""
    artifact = cp.save(LOC, 0, {"n": 12345})
    head, inline, _ = cp.store.fs.cat_file(artifact.url).split(b"\n")
    payloads = json.loads(inline)
    body = artifact.implicit_manifest["body"][0][0]  # the digest of its one chunk
    payloads[body] = payloads[body][:-4] + "AAA="
    sealed = head + b"\n" + json.dumps(payloads).encode()
    cp.store.fs.pipe_file(artifact.url, sealed + b"\n" + json.dumps(cp.store.sealer.seal(sealed)).encode())
    with pytest.raises(CheckpointCorrupt, match=r"The object graph \(fields 'n'\) .* does not match its hash"):
        cp.restore(artifact)


def test_arrays_restore_writable_with_their_layout(cp):
    """Out-of-band buffers come back as writable arrays with dtype, shape and order intact."""
    state = {"c": np.arange(60_000, dtype=np.int16).reshape(300, 200),
             "f": np.asfortranarray(np.ones((500, 40))), "strided": np.arange(20_000.0)[::2]}
    back = cp.restore(cp.save(LOC, 0, state))
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value)
        assert back[name].dtype == value.dtype and back[name].flags.writeable
    assert back["f"].flags.f_contiguous


def test_nan_metadata_round_trips(cp):
    """A NaN loss in metadata is kept, and the checkpoint still lists and reads."""
    artifact = cp.save(LOC, 0, {"n": 1}, metadata={"loss": float("nan"), "best": float("inf")})
    (listed,) = cp.list(LOC)
    assert np.isnan(listed.metadata["loss"]) and listed.metadata["best"] == float("inf")
    assert listed.key == artifact.key


def test_a_format_1_checkpoint_is_listed_but_refused_at_load(cp):
    """A manifest of 0.1 (one pickle per attribute) still lists and inspects; load() refuses it
    naming the format, and the resume lookup skips it for an intact format-2 checkpoint."""
    import base64
    import pickle

    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.recovery import restore_newest_intact

    current = cp.save(LOC, 0, {"n": 2})
    old_id = "20990101T000000000000Z-a1-0000000a"  # a later attempt's: newer than `current`
    key = LOC.key(old_id)
    body = {"format": "metaflow-implicit-checkpoint", "version": 1, "key": key, "name": "mfchckpt",
            "pathspec": LOC.pathspec, "attempt": 1, "created_on": "2099-01-01T00:00:00.000000Z",
            "metadata": {}, "latest": True, "implicit_manifest": {"version": 1, "fields": {"n": {
                "type": "int", "size": 9, "hash": "xxh128:" + "0" * 32, "serializer": "cloudpickle5"}}}}
    sealed = json.dumps(body).encode() + b"\n" + json.dumps({"n": base64.b64encode(pickle.dumps(1)).decode()}).encode()
    cp.store.put_manifest(LOC, old_id, sealed + b"\n" + json.dumps(cp.store.sealer.seal(sealed)).encode())
    listed = cp.list(LOC)
    assert [a.key for a in listed] == [key, current.key] and listed[0].fields["n"].type == "int"
    assert listed[0].payload_digests() == {"0" * 32}
    with pytest.raises(CheckpointFormatError, match=r"written in format 1 .* loads formats 2 and 3 only"):
        cp.load(key)
    with pytest.warns(UserWarning, match=f"Not resuming from checkpoint {key}: .*format 1"):
        found, values = restore_newest_intact(cp, listed)
    assert found.key == current.key and values == {"n": 2}
