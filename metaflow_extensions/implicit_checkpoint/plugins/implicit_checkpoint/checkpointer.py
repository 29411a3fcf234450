"""Reading checkpoints back: find them, describe them from their manifests, restore values.

Restoring reads and verifies every payload it needs (``payloads.py``) and only then unpickles
the graph (``graph.py``); tensors and arrays wrap the very buffers the payloads were read into.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, Iterable, Iterator, Optional

from . import graph, payloads
from .exceptions import CheckpointError, CheckpointFormatError, CheckpointNotFound
from .ids import attempt_of, observe
from .manifest import LOADABLE_VERSIONS, CheckpointArtifact, TaskLocation, parse_key, read_inline, read_manifest
from .marks import PINS, RETIRED, is_marked, live_ids, marker_ids, put_marker
from .segments import Segments
from .store import CheckpointStore
from .writer import Capture, capture, commit


class Checkpointer:
    """Checkpoints of any task whose storage is ``store``."""

    def __init__(self, store: CheckpointStore):
        self.store = store
        # Manifests never change once written, so what was parsed (or saved) here is reused;
        # a listing still decides which checkpoints exist.
        self._parsed: dict[str, CheckpointArtifact] = {}
        # The bytes of the manifests read last (a resume restores one of them right after
        # finding it: its inline payloads are then not read again).
        self._raw: dict[str, bytes] = {}
        # The runs of the long lists saved or loaded last, reused by the next save (segments.py).
        self.segments = Segments()

    def save(self, loc: TaskLocation, attempt: int, state: dict[str, Any], pin: bool = False,
             **options: Any) -> CheckpointArtifact:
        """Save a dict of values as a checkpoint of ``loc``, synchronously (``writer.capture``
        takes the options: name, metadata, latest, parent, namespace, ...). The step saves
        through the same two calls: ``capture`` in the step, ``commit`` there or in a child."""
        cap = capture(loc, attempt, state, runs=self.segments, **options)  # validates first
        self.store.check_writable(loc.flow)
        return self.commit(cap, pin)

    def commit(self, cap: Capture, pin: bool = False) -> CheckpointArtifact:
        """Write a captured save (the commit point), then pin it if asked: a pinned checkpoint
        is pinned right after it exists."""
        artifact = commit(self.store, cap)
        if pin:
            put_marker(self.store, cap.loc, PINS, cap.checkpoint_id)
            artifact = replace(artifact, pinned=True)
        self.remember(artifact)
        return artifact

    def remember(self, artifact: CheckpointArtifact) -> None:
        """Keep a checkpoint this process saved, so listing it needs no read."""
        if len(self._parsed) > 100_000:
            self._parsed.clear()
        self._parsed[artifact.key] = artifact

    def known(self, key: str) -> Optional[CheckpointArtifact]:
        """The checkpoint if this process already parsed (or saved) it: manifests never change."""
        return self._parsed.get(key)

    # ----- reading -----------------------------------------------------------------------
    def read(self, key: str) -> CheckpointArtifact:
        """The checkpoint with this key, from its manifest alone (payloads are not read)."""
        return self._read_stored(key)[0]

    def _read_stored(self, key: str) -> tuple[CheckpointArtifact, dict]:
        loc, checkpoint_id = parse_key(key)
        observe([checkpoint_id])  # what this process saves next is newer (ids.py)
        data = self._raw.pop(key, None) or self.store.get_manifest(loc, checkpoint_id)
        url = self.store.manifest_url(loc, checkpoint_id)
        return read_manifest(data, url, self.store.sealer, key), read_inline(data, url)

    def restore(self, artifact: CheckpointArtifact, fields: Optional[Iterable[str]] = None) -> dict[str, Any]:
        """Fetch, verify and deserialize the payloads of a checkpoint (as its stored manifest
        describes them, whatever the artifact passed in says)."""
        return self.load(artifact.key, fields)[1]

    def load(self, key: str, fields: Optional[Iterable[str]] = None) -> tuple[CheckpointArtifact, dict[str, Any]]:
        """The checkpoint with this key and its restored values: one manifest read. With
        ``fields``, only those (and the objects they share with other fields) are fetched."""
        artifact, inline = self._read_stored(key)
        manifest, entries = artifact.implicit_manifest, artifact.implicit_manifest.get("fields", {})
        wanted = None if fields is None else list(fields)
        unknown = [n for n in wanted or () if n not in entries]
        if unknown:
            raise CheckpointNotFound(
                f"Checkpoint {artifact.key} has no field {', '.join(map(repr, unknown))}; "
                f"it holds {sorted(entries)}."
            )
        if manifest.get("version") not in LOADABLE_VERSIONS or manifest.get("serializer") != graph.SERIALIZER:
            raise CheckpointFormatError(
                f"Checkpoint {artifact.key} was written in format {manifest.get('version')!r} "
                f"({manifest.get('serializer', 'cloudpickle5')}) by an older metaflow-implicit-checkpoint; "
                f"this version loads formats {' and '.join(map(str, LOADABLE_VERSIONS))} only (it still lists, inspects and "
                "garbage-collects it). Load it with the version that wrote it "
                "(pip install 'metaflow-implicit-checkpoint<0.2'), or start afresh."
            )
        closure, needed = graph.needed_buffers(entries, wanted)
        body, buffers = payloads.read(self.store, artifact, inline, needed)
        return artifact, graph.decode(body, buffers, entries, wanted, closure, artifact.key, self.segments)

    def list(self, loc: TaskLocation, name: Optional[str] = None, attempt: Optional[int] = None,
             step: Optional[int] = None) -> list[CheckpointArtifact]:
        """A task's checkpoints over all its attempts, newest first (``ids.py``: by attempt, then
        the order the attempt saved them, whatever the clocks said; deleted ones hidden,
        ``pinned`` filled in). ``name``, ``attempt`` and ``step`` filter."""
        found_ids = live_ids(self.store, loc)  # oldest first
        if attempt is not None:
            found_ids = [i for i in found_ids if attempt_of(i) == attempt]
        found = [a for a in self._read_many(loc, reversed(found_ids))
                 if (name is None or a.name == name) and (step is None or a.step == step)]
        return _with_pins(found, loc, self.store)

    def find_resumable(
        self, loc: TaskLocation, attempt: int, *, other_runs: bool, namespace: Optional[str]
    ) -> Optional[CheckpointArtifact]:
        """The newest ``latest`` checkpoint of this task's earlier attempts; with
        ``other_runs``, else the newest of the same flow, step and foreach position in
        earlier runs of ``namespace``."""
        return next(self.resumable(loc, attempt, other_runs=other_runs, namespace=namespace), None)

    def resumable(
        self, loc: TaskLocation, attempt: int, *, other_runs: bool, namespace: Optional[str]
    ) -> Iterator[CheckpointArtifact]:
        """Every checkpoint ``find_resumable`` could pick, best first (to fall back on)."""
        own = [i for i in reversed(live_ids(self.store, loc)) if attempt_of(i) < attempt]
        for start in range(0, len(own), 16):  # newest first, a few manifests at a time
            yield from (a for a in self._read_many(loc, own[start:start + 16]) if a.latest)
        if other_runs:
            yield from (a for a in self.other_runs(loc, namespace) if a.latest)

    def other_runs(self, loc: TaskLocation, namespace: Optional[str]) -> Iterator[CheckpointArtifact]:
        """The live checkpoints of the same flow, step and position in other runs of
        ``namespace``, newest first (what ``eager`` resumes from)."""
        for other, checkpoint_id in reversed(self.store.list_position(loc.flow, loc.step, loc.position)):
            if other.run == loc.run:
                continue
            for artifact in self._read_many(other, [checkpoint_id]):
                if artifact.namespace == namespace and not is_marked(self.store, other, RETIRED, checkpoint_id):
                    yield artifact

    def _read_many(self, loc: TaskLocation, ids: Iterable[str]) -> list[CheckpointArtifact]:
        ids = list(ids)
        missing = [i for i in ids if loc.key(i) not in self._parsed]
        folder, sealer = self.store.task_url(loc), self.store.sealer.fixed()
        for checkpoint_id, data in self.store.get_manifests(loc, missing):
            if data is None:
                continue  # deleted between listing and reading
            try:
                self.remember(read_manifest(data, f"{folder}/{checkpoint_id}.json", sealer, loc.key(checkpoint_id)))
                self._raw[loc.key(checkpoint_id)] = data
                while len(self._raw) > 32:
                    del self._raw[next(iter(self._raw))]
            except CheckpointError as exc:
                warnings.warn(f"Skipping unreadable checkpoint {loc.key(checkpoint_id)}: {exc}")
        return [self._parsed[k] for k in map(loc.key, ids) if k in self._parsed]


def _with_pins(found: list[CheckpointArtifact], loc: TaskLocation, store) -> list[CheckpointArtifact]:
    pins = marker_ids(store, loc, PINS) if found else set()
    pinned = [a.key.rsplit("/", 1)[1] in pins for a in found]
    return [a if a.pinned == p else replace(a, pinned=p) for a, p in zip(found, pinned)]


