"""Damage after commit, signed manifests and hostile input, on every backend: what load() falls
back to, what it refuses, and that nothing it refuses is ever unpickled."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import CurrentCheckpoint, StepContext
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import (
    CheckpointCorrupt,
    CheckpointFormatError,
    CheckpointSaveError,
    CheckpointUntrusted,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation, parse_key
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.signing import SECRET_ENV, Sealer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.graph import SERIALIZER, encode
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.storage_options import storage_options
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import CheckpointStore, content_hash

LOC = TaskLocation("SafeFlow", "5", "train", "2")
ID = "20260101T000000000000Z-a0-0123abcd"


@pytest.fixture
def cp(root_url):
    return Checkpointer(CheckpointStore(root_url, storage_options(root_url)))


def facade(cp, attempt, reserved=frozenset()):
    """current.checkpoint of attempt ``attempt`` of LOC, on a plain object standing in for self."""
    ctx = StepContext(
        flow=SimpleNamespace(), location=LOC, attempt=attempt, load_policy="fresh", include=None,
        exclude=None, reserved=reserved, namespace=None, on_first_use=lambda: None,
        on_loaded=lambda artifact: None,
    )
    return CurrentCheckpoint(Checkpointer(cp.store), ctx), ctx.flow  # a fresh process per attempt


def save_three(cp):
    """Attempt 0 saves w = 0, 1, 2 (a distinct payload each); returns the artifacts oldest first."""
    api, me = facade(cp, 0)
    saved = []
    for i in range(3):
        me.i, me.w = i, np.full(1000, float(i))
        saved.append(api.save(wait=True))
    return saved


def logged(capsys) -> str:
    """What current.checkpoint printed to the task's log (stderr)."""
    return capsys.readouterr().err


def payload_url(cp, artifact, field):
    ((digest, _),) = artifact.field_payloads(field)
    return cp.store.fs.unstrip_protocol(cp.store._object_path(LOC.flow, digest))


def damage(fs, url, how):
    data = fs.cat_file(url)
    if how == "deleted":
        fs.rm_file(url)
    elif how == "truncated":
        fs.pipe_file(url, data[: len(data) // 2])
    else:  # one bit flipped in the middle
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01
        fs.pipe_file(url, bytes(flipped))


@pytest.mark.parametrize("how", ["bit flip", "truncated", "deleted"])
def test_load_falls_back_past_a_damaged_payload_naming_it(cp, how, capsys):
    """Default load() warns in the task's log naming the checkpoint and field, then restores the
    newest intact one."""
    saved = save_three(cp)
    damage(cp.store.fs, payload_url(cp, saved[2], "w"), how)
    api, me = facade(cp, 1)
    loaded = api.load()
    assert f"@checkpoint warning: Not resuming from damaged checkpoint {saved[2].key}: Field 'w'" in logged(capsys)
    assert loaded.key == saved[1].key == api.latest.key
    assert me.i == 1 and np.array_equal(me.w, np.full(1000, 1.0))


@pytest.mark.parametrize("how", ["bit flip", "truncated", "deleted"])
def test_an_explicit_reference_to_a_damaged_checkpoint_raises(cp, how):
    """load(reference) never falls back; inspect() and list() still work from manifests."""
    saved = save_three(cp)
    damage(cp.store.fs, payload_url(cp, saved[2], "w"), how)
    api, _ = facade(cp, 1)
    with pytest.raises(CheckpointCorrupt, match=f"Field 'w' of checkpoint {saved[2].key}"):
        api.load(saved[2])
    assert [a.key for a in api.list()] == [a.key for a in saved[::-1]]
    assert api.inspect(saved[2])["fields"]["w"]["type"] == "numpy.ndarray"


@pytest.mark.parametrize("how", ["bit flip", "truncated", "deleted"])
def test_a_damaged_manifest_is_skipped_by_list_and_load(cp, how, capsys):
    """A manifest damaged after commit is left out of list() with a warning naming it, and load()
    resumes from the one before."""
    saved = save_three(cp)
    damage(cp.store.fs, saved[2].url, how)
    api, me = facade(cp, 1)
    named = f"Skipping unreadable checkpoint {saved[2].key}"  # a deleted manifest is simply gone
    assert [a.key for a in api.list()] == [saved[1].key, saved[0].key]
    assert (named in logged(capsys)) is (how != "deleted")
    assert api.load().key == saved[1].key and me.i == 1
    assert (named in logged(capsys)) is (how != "deleted")


def test_a_changed_metadata_digit_fails_the_manifest_checksum(cp):
    """An edit that keeps the manifest valid JSON still breaks its seal."""
    artifact = cp.save(LOC, 0, {"n": 1}, metadata={"loss": 0.25})
    cp.store.fs.pipe_file(artifact.url, cp.store.fs.cat_file(artifact.url).replace(b"0.25", b"0.26"))
    with pytest.raises(CheckpointCorrupt, match="does not match its checksum"):
        cp.read(artifact.key)


def test_a_manifest_copied_to_another_checkpoint_id_is_refused(cp):
    """A sealed manifest is only valid at its own key."""
    artifact = cp.save(LOC, 0, {"n": 1})
    other = LOC.key(ID)
    cp.store.fs.pipe_file(cp.store.manifest_url(LOC, ID), cp.store.fs.cat_file(artifact.url))
    with pytest.raises(CheckpointCorrupt, match=f"belongs to '{artifact.key}', not to {other}"):
        cp.read(other)


class Trap:
    """Unpickling this creates a file: proof that a payload was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def forge(cp, marker: Path) -> str:
    """What someone with write access but no secret can do: a payload that runs code when
    unpickled, and a manifest naming it, with a correct checksum. Returns its key."""
    graph = encode({"i": Trap(marker)}, "a forger's script")
    digest = content_hash([graph.body], "sha256")
    cp.store.put_object(LOC.flow, digest, [graph.body])
    key = LOC.key("20300101T000000000000Z-a0-00000bad")
    body = {"format": "metaflow-implicit-checkpoint", "version": 2, "key": key, "name": "mfchckpt",
            "pathspec": LOC.pathspec, "attempt": 0, "created_on": "2030-01-01T00:00:00.000000Z",
            "metadata": {}, "implicit_manifest": {
                "version": 2, "serializer": SERIALIZER, "fields": graph.fields, "hash": "sha256",
                "body": [digest, len(graph.body)], "buffers": []}, "latest": True}
    sealed = json.dumps(body).encode() + b"\n{}"
    seal = Sealer(secret=None, env="UNSET_" + SECRET_ENV).seal(sealed)
    url = cp.store.manifest_url(*parse_key(key))
    cp.store.fs.makedirs(url.rsplit("/", 1)[0], exist_ok=True)
    cp.store.fs.pipe_file(url, sealed + b"\n" + json.dumps(seal).encode())
    return key


def test_without_a_secret_a_forged_checkpoint_loads_which_is_the_trust_boundary(cp, tmp_path, monkeypatch):
    """Documents why the secret exists: a checksum alone does not stop a forger."""
    monkeypatch.delenv(SECRET_ENV, raising=False)
    key = forge(cp, tmp_path / "unpickled")
    cp.restore(cp.read(key))
    assert (tmp_path / "unpickled").exists()


def test_with_a_secret_forged_or_unsigned_checkpoints_are_refused_before_unpickling(
    cp, tmp_path, monkeypatch, capsys
):
    """With the secret set, signed checkpoints load; a forged one is skipped by load() and list()
    and refused when named, and its payload is never unpickled."""
    monkeypatch.setenv(SECRET_ENV, "s3cret")
    save_three(cp)
    key = forge(cp, tmp_path / "unpickled")
    api, me = facade(cp, 1)
    assert api.load().name == "mfchckpt" and me.i == 2
    assert re.search(f"{key}: The manifest .* is not signed", logged(capsys))
    assert key not in [a.key for a in api.list()]
    with pytest.raises(CheckpointUntrusted, match="is not signed"):
        api.load(key)
    assert not (tmp_path / "unpickled").exists()


def test_a_checkpoint_signed_with_another_secret_is_refused(cp, monkeypatch):
    """A manifest signed with a different secret is not trusted."""
    monkeypatch.setenv(SECRET_ENV, "old-secret")
    artifact = cp.save(LOC, 0, {"n": 1})
    assert cp.restore(cp.read(artifact.key)) == {"n": 1}
    monkeypatch.setenv(SECRET_ENV, "new-secret")
    with pytest.raises(CheckpointUntrusted, match="signed with another secret"):
        cp.read(artifact.key)


@pytest.mark.parametrize("key", [
    f"../x/train/2/root/{ID}", f"SafeFlow/../train/2/root/{ID}", f"SafeFlow/5/train/2/../{ID}",
    f"SafeFlow/5/train/2/.hidden/{ID}", f"SafeFlow/5/train/2\\..\\x/root/{ID}", f"SafeFlow/5/tr\x00ain/2/root/{ID}",
    f"SafeFlow/5/train/2/root/{ID}/..", f"/SafeFlow/5/train/2/root/{ID}",
])
def test_keys_that_could_leave_the_root_are_refused(cp, key):
    """No part of a key can climb out of the storage root, on any backend."""
    with pytest.raises(CheckpointFormatError, match="is not a checkpoint key"):
        cp.read(key)


def test_a_reference_saved_in_another_storage_is_refused(cp):
    """An artifact or dict whose url is not this storage's is refused by load, inspect, lineage."""
    artifact = cp.save(LOC, 0, {"n": 1})
    foreign = {**artifact.to_dict(), "url": "s3://elsewhere/ckpt/" + artifact.url.split("/SafeFlow/", 1)[1]}
    api, _ = facade(cp, 1)
    for call in (api.load, api.inspect, api.lineage):
        with pytest.raises(CheckpointFormatError, match="outside this storage"):
            call(foreign)
    assert api.inspect(artifact.to_dict()) == artifact.implicit_manifest  # its own url is fine
    assert api.load({**foreign, "url": None}).key == artifact.key  # the key alone is read here


def test_another_flows_checkpoint_is_refused_by_load(cp):
    """A step loads only its own flow's checkpoints onto self."""
    other = cp.save(TaskLocation("OtherFlow", "1", "train", "2"), 0, {"n": 1})
    api, me = facade(cp, 1)
    with pytest.raises(CheckpointFormatError, match="belongs to another flow"):
        api.load(other.key)
    assert not vars(me)


@pytest.mark.parametrize("name", ["a/b", "..", "a..b", "back\\slash", "nul\x00", "bell\x07", "del\x7f",
                                  "x" * 129, "", None])
def test_hostile_names_are_refused_and_nothing_is_written(cp, name):
    """Separators, dot-dot, control characters, overlong or empty names are refused up front."""
    with pytest.raises(CheckpointSaveError, match="Invalid checkpoint name"):
        cp.save(LOC, 0, {"n": 1}, name=name)
    assert not cp.store.fs.exists(cp.store.root)


@pytest.mark.parametrize("metadata, says", [
    ({"ok": 1, "bad": {1, 2}}, "key 'bad' is not JSON-serializable"),
    ({"nested": [1, {"deep": object()}]}, "key 'nested' is not JSON-serializable"),
    ({"raw": b"bytes"}, "key 'raw' is not JSON-serializable"),
    ({3: "int key"}, "key 3 must be a string"),
    ("not a dict", "must be a dict, not str"),
])
def test_metadata_that_is_not_json_names_the_key(cp, metadata, says):
    """Metadata must be a JSON object; the offending key is named and nothing is written."""
    with pytest.raises(CheckpointSaveError, match=says):
        cp.save(LOC, 0, {"n": 1}, metadata=metadata)
    assert not cp.store.fs.exists(cp.store.root)


@pytest.mark.parametrize("edit, error", [
    ({"version": 4}, "Upgrade metaflow-implicit-checkpoint"),
    ({"version": "1"}, "Upgrade metaflow-implicit-checkpoint"),
    ({"format": "something-else"}, "is not a metaflow-implicit-checkpoint manifest"),
])
def test_manifests_of_unknown_formats_are_refused_clearly(cp, edit, error):
    """A future or foreign manifest says what it is instead of failing obscurely."""
    artifact = cp.save(LOC, 0, {"n": 1})
    head, rest = cp.store.fs.cat_file(artifact.url).split(b"\n", 1)
    body = {**json.loads(head), **edit}
    cp.store.fs.pipe_file(artifact.url, json.dumps(body).encode() + b"\n" + rest)
    with pytest.raises(CheckpointFormatError, match=error):
        cp.read(artifact.key)



def test_a_flipped_bit_anywhere_in_a_payloads_first_bytes_is_damage_and_falls_back(tmp_path):
    """Every single-bit flip in the first 24 bytes of the pickle stream (protocol and frame
    headers, lengths included) and of a tensor-sized buffer is named damage, never a huge
    allocation: sizes come from the sealed manifest and hashes are checked before unpickling."""
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import CheckpointCorrupt
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.recovery import restore_newest_intact

    cp = Checkpointer(CheckpointStore(str(tmp_path / "root")))
    # notes: pairs, not strings, so they stay in the stream (a long list of strings is runs)
    older = cp.save(LOC, 0, {"w": np.zeros(2000), "notes": [(f"old {i:05d} " * 4, i) for i in range(200)]})
    newest = cp.save(LOC, 0, {"w": np.ones(2000), "notes": [(f"new {i:05d} " * 4, i) for i in range(200)]})
    for digest, size in newest.payloads():
        assert size > 4096  # both are objects of their own, not inline
        path = Path(cp.store._object_path(LOC.flow, digest))
        clean = path.read_bytes()
        for byte in range(24):
            for bit in range(8):
                flipped = bytearray(clean)
                flipped[byte] ^= 1 << bit
                path.write_bytes(bytes(flipped))
                with pytest.raises(CheckpointCorrupt, match="does not match its hash"):
                    cp.load(newest.key)
                with pytest.warns(UserWarning, match=f"damaged checkpoint {newest.key}"):
                    found, _ = restore_newest_intact(cp, [newest, older])
                assert found.key == older.key
        path.write_bytes(clean)
