"""Save, read, restore and find checkpoints: the Metaflow-free engine behind the API.

``save`` call order, ending in the step that makes the checkpoint visible:

1. validate the name and metadata (nothing is written for a bad call); on the first save, check
   that the storage can be written at all (an error names the URL, in the caller's thread);
2. for each attribute: serialize, hash, write the payload unless the store has that hash;
3. stamp a time-sortable id and write the manifest: the commit point.

A failure before step 3 leaves no checkpoint and touches no earlier one.
"""
from __future__ import annotations

import json
import time
import warnings
from typing import Any, Iterable, Iterator, Optional

from .exceptions import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointNotFound,
    CheckpointSaveError,
    CheckpointStorageError,
)
from .manifest import (
    FORMAT_VERSION,
    CheckpointArtifact,
    FieldEntry,
    TaskLocation,
    manifest_bytes,
    new_checkpoint_id,
    parse_key,
    read_manifest,
)
from .snapshot import SERIALIZERS, Serializer, serialize_field, type_name
from .store import HASH_NAME, CheckpointStore, content_hash

MAX_NAME_LENGTH = 128


class Checkpointer:
    """Checkpoints of any task whose storage is ``store``."""

    def __init__(self, store: CheckpointStore, serializer: Serializer = SERIALIZERS["cloudpickle"]):
        self.store = store
        self.serializer = serializer

    # ----- writing -----------------------------------------------------------------------
    def save(
        self,
        loc: TaskLocation,
        attempt: int,
        state: dict[str, Any],
        *,
        name: str = "mfchckpt",
        metadata: Optional[dict] = None,
        latest: bool = True,
        parent: Optional[str] = None,
        namespace: Optional[str] = None,
        where: str = "the step",
    ) -> CheckpointArtifact:
        started = time.perf_counter()
        check_name(name, where)
        metadata = check_metadata(metadata, where)
        self.store.check_writable(loc.flow)
        fields, size, written = {}, 0, 0
        for attr, value in state.items():
            data = serialize_field(self.serializer, attr, value, where)
            digest = content_hash(data)
            written += self.store.put_object(loc.flow, digest, data)
            entry = FieldEntry(type_name(value), len(data), f"{HASH_NAME}:{digest}", self.serializer.name)
            fields[attr] = entry.to_dict()
            size += len(data)
            del data  # hold at most one serialized attribute at a time
        checkpoint_id, created_on = new_checkpoint_id(attempt)
        artifact = CheckpointArtifact(
            key=loc.key(checkpoint_id),
            name=name,
            pathspec=loc.pathspec,
            attempt=attempt,
            created_on=created_on,
            metadata=metadata,
            implicit_manifest={"version": FORMAT_VERSION, "fields": fields},
            size=size,
            parent=parent,
            latest=latest,
            namespace=namespace,
            written=written,
            save_seconds=round(time.perf_counter() - started, 6),
        )
        url = self.store.put_manifest(loc, checkpoint_id, manifest_bytes(artifact, self.store.sealer))
        return artifact.with_url(url)

    # ----- reading -----------------------------------------------------------------------
    def read(self, key: str) -> CheckpointArtifact:
        """The checkpoint with this key, from its manifest alone (payloads are not read)."""
        loc, checkpoint_id = parse_key(key)
        data = self.store.get_manifest(loc, checkpoint_id)
        return read_manifest(data, self.store.manifest_url(loc, checkpoint_id), self.store.sealer, key)

    def restore(self, artifact: CheckpointArtifact, fields: Optional[Iterable[str]] = None) -> dict[str, Any]:
        """Fetch, verify and deserialize the payloads of a checkpoint."""
        entries = artifact.fields
        wanted = list(entries) if fields is None else list(fields)
        unknown = [n for n in wanted if n not in entries]
        if unknown:
            raise CheckpointNotFound(
                f"Checkpoint {artifact.key} has no field {', '.join(map(repr, unknown))}; "
                f"it holds {sorted(entries)}."
            )
        return {n: self._restore_field(artifact, n, entries[n]) for n in wanted}

    def _restore_field(self, artifact: CheckpointArtifact, name: str, entry: FieldEntry) -> Any:
        algorithm, _, digest = entry.hash.partition(":")
        try:
            data = self.store.get_object(artifact.location.flow, digest)
        except CheckpointNotFound:
            raise CheckpointCorrupt(
                f"Field {name!r} of checkpoint {artifact.key} is missing its payload "
                f"({entry.hash}). Load an earlier checkpoint (see list())."
            ) from None
        if algorithm != HASH_NAME or content_hash(data) != digest:
            raise CheckpointCorrupt(
                f"Field {name!r} of checkpoint {artifact.key} does not match its hash "
                f"{entry.hash}: the stored bytes were damaged. Load an earlier checkpoint "
                "(see list())."
            )
        serializer = SERIALIZERS.get(entry.serializer)
        if serializer is None:
            raise CheckpointCorrupt(
                f"Field {name!r} of checkpoint {artifact.key} uses serializer "
                f"{entry.serializer!r}, unknown here. Upgrade metaflow-implicit-checkpoint."
            )
        return serializer.loads(data)

    def list(self, loc: TaskLocation, name: Optional[str] = None, attempt: Optional[int] = None) -> list[CheckpointArtifact]:
        """A task's checkpoints over all its attempts, newest first by creation time."""
        ids = self.store.list_task(loc)
        if attempt is not None:
            ids = [i for i in ids if _attempt_of(i) == attempt]
        found = [a for a in self._read_many(loc, reversed(ids)) if name is None or a.name == name]
        return sorted(found, key=lambda a: a.created_on, reverse=True)

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
        own = [i for i in reversed(self.store.list_task(loc)) if _attempt_of(i) < attempt]
        yield from (a for a in self._read_many(loc, own) if a.latest)
        if not other_runs:
            return
        for other, checkpoint_id in reversed(self.store.list_position(loc.flow, loc.step, loc.position)):
            if other.run == loc.run:
                continue
            for artifact in self._read_many(other, [checkpoint_id]):
                if artifact.latest and artifact.namespace == namespace:
                    yield artifact

    def _read_many(self, loc: TaskLocation, ids: Iterable[str]) -> Iterable[CheckpointArtifact]:
        for checkpoint_id in ids:
            try:
                yield self.read(loc.key(checkpoint_id))
            except CheckpointNotFound:
                continue  # deleted between listing and reading
            except CheckpointStorageError:
                raise  # the storage is failing, not this checkpoint: never report "nothing"
            except CheckpointError as exc:
                warnings.warn(f"Skipping unreadable checkpoint {loc.key(checkpoint_id)}: {exc}")


def _attempt_of(checkpoint_id: str) -> int:
    return int(checkpoint_id.split("-")[1][1:])


def check_name(name: Any, where: str) -> None:
    if (
        not isinstance(name, str)
        or not name
        or len(name) > MAX_NAME_LENGTH
        or "/" in name
        or "\\" in name
        or ".." in name
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    ):
        raise CheckpointSaveError(
            f"Invalid checkpoint name {name!r} in {where}: use 1 to {MAX_NAME_LENGTH} "
            "printable characters without '/', '\\' or '..' (for example 'epoch-end')."
        )


def check_metadata(metadata: Optional[dict], where: str) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise CheckpointSaveError(
            f"save(metadata=...) in {where} must be a dict, not {type_name(metadata)}."
        )
    for key, value in metadata.items():
        try:
            json.dumps({key: value}, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise CheckpointSaveError(
                f"save(metadata=...) in {where}: the value of key {key!r} is not "
                f"JSON-serializable ({exc}). Convert it, e.g. float(x) or str(x)."
            ) from None
        if not isinstance(key, str):
            raise CheckpointSaveError(
                f"save(metadata=...) in {where}: key {key!r} must be a string."
            )
    return json.loads(json.dumps(metadata))
