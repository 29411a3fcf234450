"""Writing a checkpoint, in two phases: ``capture`` in the step, ``commit`` wherever it runs.

``capture`` validates the call and pickles every attribute as one graph (``graph.py``); the
out-of-band buffers (numpy arrays, torch storages) stay views of the live memory, so its cost
grows with the number of objects, not with their bytes. ``commit`` then runs, in the step
(synchronous saves) or in a forked child that sees a copy-on-write snapshot of that memory
(asynchronous saves), in this order:

1. hash the pickle stream and each buffer (xxh3-128 at memory speed; sha256 when manifests
   are signed): every one is a payload addressed by its content (``payloads.py``);
2. payloads up to ``INLINE_MAX`` bytes go inside the manifest; any other is written as its own
   object unless the store already has its hash (an unchanged tensor or array costs nothing);
3. write the manifest: the commit point. Before it, the checkpoint does not exist.
"""
from __future__ import annotations

import json
import numbers
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

from . import payloads
from .exceptions import CheckpointSaveError
from .graph import SERIALIZER, Graph, encode
from .manifest import FORMAT_VERSION, CheckpointArtifact, TaskLocation, manifest_bytes, new_checkpoint_id
from .segments import Segments
from .snapshot import type_name
from .store import CheckpointStore

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
    graph: Graph
    started: float
    resumed_from: Optional[str] = None
    step: Optional[int] = None

    @property
    def key(self) -> str:
        return self.loc.key(self.checkpoint_id)

    @property
    def size(self) -> int:
        return self.graph.size

    def artifact(self, payloads: Optional[dict] = None, written: int = 0, url: Optional[str] = None) -> CheckpointArtifact:
        """The checkpoint; ``payloads`` (digests) are known once ``commit`` hashed them."""
        manifest = {"version": FORMAT_VERSION, "serializer": SERIALIZER, "fields": self.graph.fields,
                    **(payloads or {})}
        return CheckpointArtifact(
            key=self.key, name=self.name, pathspec=self.loc.pathspec, attempt=self.attempt,
            created_on=self.created_on, metadata=self.metadata,
            implicit_manifest=manifest, size=self.size,
            parent=self.parent, url=url, latest=self.latest, namespace=self.namespace,
            written=written, save_seconds=round(time.perf_counter() - self.started, 6),
            resumed_from=self.resumed_from, step=self.step,
        )


def capture(
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
    runs: Optional[Segments] = None,
    step: Optional[int] = None,
) -> Capture:
    """Validate and serialize; raises before anything is written."""
    started = time.perf_counter()
    check_name(name, where)
    step = check_step(step, where)
    metadata = check_metadata(metadata, where)
    graph = encode(state, where, runs)
    checkpoint_id, created_on = new_checkpoint_id(attempt)
    return Capture(loc, attempt, checkpoint_id, created_on, name, metadata, latest, parent,
                   namespace, graph, started, resumed_from, step)


def commit(store: CheckpointStore, cap: Capture) -> CheckpointArtifact:
    """Write the payloads that are new, then the manifest; return the stored checkpoint.

    ``written`` counts every byte this save put in storage: new payloads and the manifest."""
    listed, inline, written = payloads.write(store, cap.loc.flow, (cap.graph.body, *cap.graph.buffers))
    artifact = cap.artifact(listed, written)  # the manifest stores the payload bytes ...
    manifest = manifest_bytes(artifact, store.sealer, inline)
    url = store.put_manifest(cap.loc, cap.checkpoint_id, manifest)
    return replace(artifact, url=url, written=written + len(manifest))  # ... readers add its own


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


def check_step(step: Any, where: str, call: str = "save") -> Optional[int]:
    """``step`` as a plain int (numpy integers too), or ``None``."""
    if step is None:
        return None
    if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
        raise CheckpointSaveError(
            f"{call}(step={step!r}) in {where}: step must be a whole number >= 0 (the training "
            "step or epoch this state is at, e.g. step=self.epoch), or None."
        )
    return int(step)


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
