"""Hostile and bad input, generated at random and thrown at the API; every one must be refused.

Kinds: checkpoint names, metadata, references (keys, dicts, other flows, other storages), damaged
manifests and payloads of committed checkpoints, and forged checkpoints when a secret is set.
Refused means: the documented CheckpointError was raised, nothing was written, and (for damage)
the default load() fell back to the newest intact checkpoint, restoring it exactly. A forged
payload is a pickle that creates a file when unpickled: the file must never appear.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import string
import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import CurrentCheckpoint, StepContext
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointSaveError,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.signing import SECRET_ENV, Sealer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.graph import SERIALIZER, encode
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import content_hash

LOC = TaskLocation("BadInputFlow", "1", "train", "1")
ID = "20260101T000000000000Z-a0-0123abcd"


class Trap:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


class Fuzzer:
    """One task's current.checkpoint on a store, and a generator of bad input for it."""

    def __init__(self, cp: Checkpointer, seed: int):
        self.cp, self.rng = cp, random.Random(seed)
        self.me = SimpleNamespace(n=0)
        self.api = self.facade(attempt=0)  # saves; loads are made by attempt 1
        self.good = self.api.save(wait=True)
        self.marker = os.path.join(tempfile.mkdtemp(), "unpickled")

    def facade(self, attempt: int = 1) -> CurrentCheckpoint:
        """A fresh current.checkpoint (it looks up what to resume from anew)."""
        ctx = StepContext(flow=self.me, location=LOC, attempt=attempt, load_policy="fresh", include=None,
                          exclude=None, reserved=frozenset(), namespace=None,
                          on_first_use=lambda: None, on_loaded=lambda a: None)
        return CurrentCheckpoint(Checkpointer(self.cp.store), ctx)  # as a new attempt would

    def text(self, n: int = 8) -> str:
        return "".join(self.rng.choice(string.ascii_letters + string.digits + "_-.") for _ in range(n))

    # ----- one bad input of each kind: None when refused as documented, else what went wrong ----
    def name(self):
        bad = self.rng.choice([
            lambda t: t + "/" + t, lambda t: t + ".." + t, lambda t: "..", lambda t: t + "\\" + t,
            lambda t: t + chr(self.rng.choice([*range(32), 127])) + t, lambda t: t * 40,
            lambda t: "", lambda t: None, lambda t: 5, lambda t: t.encode(), lambda t: [t],
        ])(self.text())
        return self._refused_save(lambda: self.api.save(name=bad), CheckpointSaveError, repr(bad))

    def metadata(self):
        value = self.rng.choice([object(), {1, 2}, b"x", lambda: 0, [1, object()], {"d": {3}}])
        bad = self.rng.choice([
            {self.text(): 1, self.text(): value}, {self.rng.choice([1, 2.5, (1, 2), None]): 1},
            [self.text()], self.text(), 7,
        ])
        return self._refused_save(lambda: self.api.save(metadata=bad), CheckpointSaveError, repr(bad))

    def reference(self):
        good = self.good
        parts = good.key.split("/")
        i = self.rng.randrange(6)
        part = self.rng.choice(["..", ".", ".x", "a/b", "a\\b", "", "x\x00", "\n", self.text() + "/.."])
        bad = self.rng.choice([
            "/".join(parts[:i] + [part] + parts[i + 1:]), "/".join(parts[:i]), good.key + "/extra",
            {**good.to_dict(), "url": self.rng.choice(["s3://other/", "file:///tmp/", "memory://x/"]) + self.text()},
            {**good.to_dict(), "key": "OtherFlow/" + "/".join(parts[1:])}, {"key": good.key},
            42, ["list"], b"bytes",
        ])
        return self._refused(lambda: self.facade().load(bad), CheckpointFormatError, repr(bad))

    def damaged_manifest(self):
        keep, victim = self._two_checkpoints()
        data = bytearray(self.cp.store.fs.cat_file(victim.url))
        how = self.rng.choice(["flip", "truncate", "edit"])
        if how == "flip":
            data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        elif how == "truncate":
            data = data[: self.rng.randrange(len(data))]
        else:  # edit the checkpoint's JSON line (line 1 of 3) or its seal (line 3)
            head, inline, seal = bytes(data).split(b"\n")
            field = self.rng.choice(["metadata", "version", "format", "key", "implicit_manifest", "seal"])
            value = self.rng.choice([None, 99, "x", {"a": 1}, [], self.text()])
            if field == "seal":
                seal = json.dumps(value).encode()
            else:
                head = json.dumps({**json.loads(head), field: value}).encode()
            data = b"\n".join([head, inline, seal])
        self.cp.store.fs.pipe_file(victim.url, bytes(data))
        return self._falls_back(keep, victim, f"manifest {how}")

    def damaged_payload(self):
        keep, victim = self._two_checkpoints()
        digest = max(victim.payloads(), key=lambda p: p[1])[0]  # the stream, holding `pad`
        url = self.cp.store.fs.unstrip_protocol(self.cp.store._object_path(LOC.flow, digest))
        data = bytearray(self.cp.store.fs.cat_file(url))
        how = self.rng.choice(["flip", "truncate", "delete", "swap"])
        if how == "delete":
            self.cp.store.fs.rm_file(url)
        else:
            if how == "flip":
                data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
            data = data[: self.rng.randrange(len(data))] if how == "truncate" else data
            data = pickle.dumps(Trap(self.marker)) if how == "swap" else data
            self.cp.store.fs.pipe_file(url, bytes(data))
        self.cp.store._known.pop(digest, None)  # let later saves write this payload again
        return self._falls_back(keep, victim, f"payload {how}")

    def forged(self):
        os.environ[SECRET_ENV] = "the-real-secret"
        self.me.n = self.kept = self.rng.randrange(10**9)
        keep = self.api.save(wait=True)  # signed, and the newest checkpoint but for the forgery
        graph = encode({"n": Trap(self.marker)}, "a forger's script")
        digest = content_hash([graph.body], "sha256")
        self.cp.store.put_object(LOC.flow, digest, [graph.body])
        key = LOC.key(f"20990101T{self.rng.randrange(10**12):012d}Z-a0-{self.rng.randrange(16**8):08x}")
        body = {"format": "metaflow-implicit-checkpoint", "version": 2, "key": key, "name": "mfchckpt",
                "pathspec": LOC.pathspec, "attempt": 0, "created_on": "2099-01-01T00:00:00.000000Z",
                "metadata": {}, "latest": True, "implicit_manifest": {
                    "version": 2, "serializer": SERIALIZER, "fields": graph.fields, "hash": "sha256",
                    "body": [digest, len(graph.body)], "buffers": []}}
        sealed = json.dumps(body).encode() + b"\n{}"
        seal = Sealer(secret=self.rng.choice([None, "guessed"]), env="NO_" + SECRET_ENV).seal(sealed)
        url = self.cp.store.manifest_url(LOC, key.rsplit("/", 1)[1])
        self.cp.store.fs.pipe_file(url, sealed + b"\n" + json.dumps(seal).encode())
        try:
            return self._falls_back(keep, SimpleNamespace(key=key), "forged")
        finally:  # without the secret a forgery is a valid checkpoint: the trust boundary
            os.environ.pop(SECRET_ENV)
            self.cp.store.fs.rm_file(url)

    # ----- checks --------------------------------------------------------------------------
    def _two_checkpoints(self):
        self.me.n = self.kept = self.rng.randrange(10**9)
        self.me.pad = self.me.n.to_bytes(8, "little") * 1024  # large: the stream is its own payload
        keep = self.api.save(wait=True)
        self.me.n += 1
        self.me.pad = self.me.n.to_bytes(8, "little") * 1024
        return keep, self.api.save(wait=True)

    def _refused(self, call: Callable, error: type, what: str):
        try:
            call()
        except error:
            return None
        except Exception as exc:  # noqa: BLE001 - any other exception is a finding
            return f"{what}: {type(exc).__name__}: {exc}"
        return f"{what}: accepted"

    def _refused_save(self, call: Callable, error: type, what: str):
        before = len(self.cp.store.list_task(LOC))
        return self._refused(call, error, what) or (
            None if len(self.cp.store.list_task(LOC)) == before else f"{what}: refused, but written")

    def _falls_back(self, keep, victim, what: str):
        problem = self._refused(lambda: self.cp.restore(self.cp.read(victim.key)), CheckpointError, what)
        if problem is None:
            with contextlib.redirect_stderr(io.StringIO()):  # its warnings name what it skipped
                loaded = self.facade().load()
            if loaded is None or loaded.key != keep.key or self.me.n != self.kept:
                problem = f"{what}: load() restored {loaded and loaded.key}, not {keep.key}"
        if os.path.exists(self.marker):
            problem = f"{what}: a refused payload was unpickled"
        return problem


KINDS = ("name", "metadata", "reference", "damaged_manifest", "damaged_payload", "forged")


def run(cp: Checkpointer, count: int, seed: int) -> dict:
    """Try ``count`` bad inputs against ``cp``'s store; returns tallies and any findings."""
    fuzzer = Fuzzer(cp, seed)
    tried, findings = Counter(), []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        tried[kind] += 1
        finding = getattr(fuzzer, kind)()
        if finding:
            findings.append(f"{kind}: {finding}")
    return {"tried": sum(tried.values()), "by_kind": dict(tried), "findings": findings}
