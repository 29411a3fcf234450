"""Reading checkpoints back: find them, describe them from their manifests, restore values.

Restoring reads each payload's frames straight into freshly allocated buffers (one copy, disk to
memory), hashes them on the way, and only unpickles once every hash matched.
"""
from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
import warnings
from dataclasses import replace
from typing import Any, Iterable, Iterator, Optional

from .exceptions import CheckpointCorrupt, CheckpointError, CheckpointNotFound
from .manifest import CheckpointArtifact, FieldEntry, TaskLocation, parse_key, read_inline, read_manifest
from .ids import attempt_of, observe
from .marks import PINS, RETIRED, is_marked, live_ids, marker_ids
from .snapshot import SERIALIZERS, read_frame_header
from .store import HASHES, CheckpointStore


class Checkpointer:
    """Checkpoints of any task whose storage is ``store``."""

    def __init__(self, store: CheckpointStore):
        self.store = store
        # Manifests never change once written, so what was parsed (or saved) here is reused;
        # a listing still decides which checkpoints exist.
        self._parsed: dict[str, CheckpointArtifact] = {}

    def save(self, loc: TaskLocation, attempt: int, state: dict[str, Any], **options: Any) -> CheckpointArtifact:
        """Save a dict of values as a checkpoint of ``loc``, synchronously (``writer.capture``
        takes the options: name, metadata, latest, parent, namespace, ...)."""
        from .snapshot import DEFAULT_SERIALIZER
        from .writer import capture, commit

        cap = capture(DEFAULT_SERIALIZER, loc, attempt, state, **options)  # validates first
        self.store.check_writable(loc.flow)
        artifact = commit(self.store, cap)
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
        data = self.store.get_manifest(loc, checkpoint_id)
        url = self.store.manifest_url(loc, checkpoint_id)
        return read_manifest(data, url, self.store.sealer, key), read_inline(data, url)

    def restore(self, artifact: CheckpointArtifact, fields: Optional[Iterable[str]] = None) -> dict[str, Any]:
        """Fetch, verify and deserialize the payloads of a checkpoint (as its stored manifest
        describes them, whatever the artifact passed in says)."""
        return self.load(artifact.key, fields)[1]

    def load(self, key: str, fields: Optional[Iterable[str]] = None) -> tuple[CheckpointArtifact, dict[str, Any]]:
        """The checkpoint with this key and its restored values: one manifest read."""
        artifact, inline = self._read_stored(key)
        entries = artifact.fields
        wanted = list(entries) if fields is None else list(fields)
        unknown = [n for n in wanted if n not in entries]
        if unknown:
            raise CheckpointNotFound(
                f"Checkpoint {artifact.key} has no field {', '.join(map(repr, unknown))}; "
                f"it holds {sorted(entries)}."
            )
        return artifact, {n: self._restore_field(artifact, n, entries[n], inline.get(n)) for n in wanted}

    def _restore_field(self, artifact: CheckpointArtifact, name: str, entry: FieldEntry, inline) -> Any:
        algorithm, _, digest = entry.hash.partition(":")
        serializer = SERIALIZERS.get(entry.serializer)
        if serializer is None or algorithm not in HASHES:
            raise CheckpointCorrupt(
                f"Field {name!r} of checkpoint {artifact.key} uses {entry.serializer!r} / "
                f"{algorithm!r}, unknown here. Upgrade metaflow-implicit-checkpoint."
            )
        try:
            if inline is not None:
                frames = _read_frames(io.BytesIO(base64.b64decode(inline)), HASHES[algorithm]())
            else:
                with self.store.open_object(artifact.location.flow, digest) as f:
                    frames = _read_frames(f, HASHES[algorithm]())
        except CheckpointNotFound:
            raise CheckpointCorrupt(
                f"Field {name!r} of checkpoint {artifact.key} is missing its payload "
                f"({entry.hash}). Load an earlier checkpoint (see list())."
            ) from None
        except (ValueError, EOFError):
            frames = None
        if frames is None or frames[0] != digest:
            raise CheckpointCorrupt(
                f"Field {name!r} of checkpoint {artifact.key} does not match its hash "
                f"{entry.hash}: the stored bytes were damaged. Load an earlier checkpoint "
                "(see list())."
            )
        return serializer.loads(frames[1], frames[2])

    def list(self, loc: TaskLocation, name: Optional[str] = None, attempt: Optional[int] = None) -> list[CheckpointArtifact]:
        """A task's checkpoints over all its attempts, newest first (``ids.py``: by attempt, then
        the order the attempt saved them, whatever the clocks said; deleted ones hidden,
        ``pinned`` filled in)."""
        found_ids = live_ids(self.store, loc)  # oldest first
        if attempt is not None:
            found_ids = [i for i in found_ids if attempt_of(i) == attempt]
        found = [a for a in self._read_many(loc, reversed(found_ids)) if name is None or a.name == name]
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
        if not other_runs:
            return
        for other, checkpoint_id in reversed(self.store.list_position(loc.flow, loc.step, loc.position)):
            if other.run == loc.run:
                continue
            for artifact in self._read_many(other, [checkpoint_id]):
                if artifact.latest and artifact.namespace == namespace:
                    if not is_marked(self.store, other, RETIRED, checkpoint_id):
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
            except CheckpointError as exc:
                warnings.warn(f"Skipping unreadable checkpoint {loc.key(checkpoint_id)}: {exc}")
        return [self._parsed[k] for k in map(loc.key, ids) if k in self._parsed]


_CHUNK = 16 << 20


def _read_frames(f, hasher) -> tuple[str, bytes, list]:
    """(hash, body, buffers) of one framed payload. Each buffer is read straight into place,
    16 MiB at a time, while a second thread hashes the chunk read before (both release the GIL),
    so verifying costs no time on top of reading."""
    header = bytearray()

    def read_header(n: int) -> bytes:
        data = f.read(n)
        if len(data) != n:
            raise EOFError("payload is truncated")
        header.extend(data)
        return data

    body_len, *buffer_lens = read_frame_header(read_header)
    body = f.read(body_len)
    if len(body) != body_len:
        raise EOFError("payload is truncated")
    hasher.update(header)
    hasher.update(body)
    buffers = [_new_buffer(n) for n in buffer_lens]
    chunks = [v[i:i + _CHUNK] for v in map(_bytes_view, buffers) for i in range(0, len(v), _CHUNK)]
    with ThreadPoolExecutor(max_workers=1) as hashing:
        hashed = None
        for chunk in chunks:
            _read_into(f, chunk)
            if hashed is not None:
                hashed.result()
            hashed = hashing.submit(hasher.update, chunk)
        if hashed is not None:
            hashed.result()
    if f.read(1):
        raise EOFError("payload is longer than its frames")
    return hasher.hexdigest(), body, buffers


def _bytes_view(buffer) -> memoryview:
    return memoryview(buffer).cast("B")


def _read_into(f, view: memoryview) -> None:
    while view:
        n = f.readinto(view)
        if not n:
            raise EOFError("payload is truncated")
        view = view[n:]


def _with_pins(found: list[CheckpointArtifact], loc: TaskLocation, store) -> list[CheckpointArtifact]:
    pins = marker_ids(store, loc, PINS) if found else set()
    pinned = [a.key.rsplit("/", 1)[1] in pins for a in found]
    return [a if a.pinned == p else replace(a, pinned=p) for a, p in zip(found, pinned)]


def _new_buffer(size: int):
    try:  # numpy's allocator uses huge pages where it can: much faster to fill than bytearray
        import numpy

        return numpy.empty(size, dtype=numpy.uint8)
    except ImportError:
        return bytearray(size)
