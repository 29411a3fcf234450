"""Writing a checkpoint, in two phases: ``capture`` in the step, ``commit`` wherever it runs.

``capture`` validates the call and serializes every attribute; out-of-band buffers (numpy
arrays) stay views of the live memory, so it costs almost nothing. ``commit`` then runs, in the
step (synchronous saves) or in a forked child that sees a copy-on-write snapshot of that memory
(asynchronous saves), in this order:

1. hash each attribute's frames (xxh3-128 at memory speed; sha256 when manifests are signed);
2. attributes up to ``INLINE_MAX`` bytes go inside the manifest; any other is written as one
   payload object unless the store already has its hash (unchanged attributes cost nothing);
3. write the manifest: the commit point. Before it, the checkpoint does not exist.
"""
from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

from .exceptions import CheckpointSaveError
from .manifest import FORMAT_VERSION, CheckpointArtifact, TaskLocation, manifest_bytes, new_checkpoint_id
from .snapshot import Encoded, Serializer, encode, type_name
from .store import INLINE_MAX, CheckpointStore, content_hash

MAX_NAME_LENGTH = 128


@dataclass(frozen=True)
class Capture:
    """A save as the step saw it: everything ``commit`` needs, buffers still shared."""

    loc: TaskLocation
    attempt: int
    checkpoint_id: str
    created_on: str
    name: str
    metadata: dict
    latest: bool
    parent: Optional[str]
    namespace: Optional[str]
    fields: dict[str, Encoded]
    started: float
    resumed_from: Optional[str] = None

    @property
    def key(self) -> str:
        return self.loc.key(self.checkpoint_id)

    @property
    def size(self) -> int:
        return sum(e.size for e in self.fields.values())

    def artifact(self, fields: dict, written: int = 0, url: Optional[str] = None) -> CheckpointArtifact:
        return CheckpointArtifact(
            key=self.key, name=self.name, pathspec=self.loc.pathspec, attempt=self.attempt,
            created_on=self.created_on, metadata=self.metadata,
            implicit_manifest={"version": FORMAT_VERSION, "fields": fields}, size=self.size,
            parent=self.parent, url=url, latest=self.latest, namespace=self.namespace,
            written=written, save_seconds=round(time.perf_counter() - self.started, 6),
            resumed_from=self.resumed_from,
        )


def capture(
    serializer: Serializer,
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
    resumed_from: Optional[str] = None,
) -> Capture:
    """Validate and serialize; raises before anything is written."""
    started = time.perf_counter()
    check_name(name, where)
    metadata = check_metadata(metadata, where)
    fields = {attr: encode(serializer, attr, state[attr], where) for attr in sorted(state)}
    checkpoint_id, created_on = new_checkpoint_id(attempt)
    return Capture(loc, attempt, checkpoint_id, created_on, name, metadata, latest, parent,
                   namespace, fields, started, resumed_from)


def commit(store: CheckpointStore, cap: Capture) -> CheckpointArtifact:
    """Write the payloads that are new, then the manifest; return the stored checkpoint."""
    fields, inline, objects, algorithm = {}, {}, [], store.hash_name
    for attr, enc in cap.fields.items():
        digest = content_hash(enc.parts, algorithm)
        fields[attr] = {"type": enc.type, "size": enc.size, "hash": f"{algorithm}:{digest}",
                        "serializer": enc.serializer}
        if enc.size <= INLINE_MAX:
            inline[attr] = base64.b64encode(b"".join(enc.parts)).decode()
        else:
            objects.append((digest, enc.parts))
    written = sum(_put_all(store, cap.loc.flow, objects))
    artifact = cap.artifact(fields, written)
    url = store.put_manifest(cap.loc, cap.checkpoint_id, manifest_bytes(artifact, store.sealer, inline))
    return artifact.with_url(url)


def _put_all(store: CheckpointStore, flow: str, objects: list) -> list[int]:
    """Write payloads: one after another on a local disk (it gains nothing from more), a few
    at a time on remote stores, where each request waits on the network."""
    if store.is_local or len(objects) < 2:
        return [store.put_object(flow, digest, parts) for digest, parts in objects]
    with ThreadPoolExecutor(max_workers=min(8, len(objects))) as pool:
        return list(pool.map(lambda item: store.put_object(flow, *item), objects))


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
        if not isinstance(key, str):
            raise CheckpointSaveError(f"save(metadata=...) in {where}: key {key!r} must be a string.")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise CheckpointSaveError(
                f"save(metadata=...) in {where}: the value of key {key!r} is not "
                f"JSON-serializable ({exc}). Convert it, e.g. float(x) or str(x)."
            ) from None
    return json.loads(json.dumps(metadata))
