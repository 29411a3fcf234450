"""What a checkpoint is, as plain data: where it belongs, what it holds, what it came from.

A checkpoint is one manifest (JSON) that names content-addressed payloads. Everything here is
a frozen dataclass with ``to_dict``/``from_dict``; lineage is just the ``parent`` key.

A checkpoint key is ``<flow>/<run>/<step>/<task>/<position>/<checkpoint id>``: the task's
pathspec, then its foreach position (``root`` outside a foreach, ``2`` or ``2.0`` inside
nested ones), then its id (``ids.py``: attempt, logical clock, creation second, random). Given the
storage root, the key alone
finds the checkpoint. A key is always read relative to one storage root: its parts may not
contain a separator or start with a dot, so no key names anything outside the root.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

import orjson

from . import ids
from .exceptions import CheckpointCorrupt, CheckpointFormatError
from .signing import Sealer

FORMAT = "metaflow-implicit-checkpoint"
# 3: each payload stored as chunks (payloads.py); 2 (0.2.x): one object graph per checkpoint
# (graph.py), each payload one object, still loaded; 1 (0.1.x): one pickle per attribute, which
# this version lists, inspects and garbage-collects but refuses to load (see checkpointer.py).
FORMAT_VERSION = 3
LOADABLE_VERSIONS = (2, 3)
ROOT_POSITION = "root"

# A part of a key becomes a path segment under the root: no separators, no leading dot ("..").
# Matched whole (fullmatch): "$" would let a trailing newline through.
_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:=+@-]{0,254}")


@dataclass(frozen=True)
class TaskLocation:
    """Which task a checkpoint belongs to, and its foreach position within the step."""

    flow: str
    run: str
    step: str
    task: str
    position: str = ROOT_POSITION

    @property
    def pathspec(self) -> str:
        return f"{self.flow}/{self.run}/{self.step}/{self.task}"

    def where(self, attempt: int) -> str:
        """How messages name an attempt of this task: ``step 'train' (F/1/train/2, attempt 0)``."""
        return f"step {self.step!r} ({self.pathspec}, attempt {attempt})"

    def key(self, checkpoint_id: str) -> str:
        return f"{self.pathspec}/{self.position}/{checkpoint_id}"

    @staticmethod
    def position_of(foreach_stack: Optional[list]) -> str:
        """``root`` outside a foreach; the branch indices joined by dots inside one."""
        if not foreach_stack:
            return ROOT_POSITION
        return ".".join(str(frame[0]) for frame in foreach_stack)


def is_key_part(text: str) -> bool:
    """Whether ``text`` can be one part of a key (a flow, run, step, task or position name)."""
    return isinstance(text, str) and bool(_PART_RE.fullmatch(text))


def parse_key(key: str) -> tuple[TaskLocation, str]:
    """Split a checkpoint key into its task location and checkpoint id."""
    parts = key.split("/") if isinstance(key, str) else []
    if len(parts) != 6 or not all(_PART_RE.fullmatch(p) for p in parts) or not ids.is_id(parts[5]):
        raise CheckpointFormatError(
            f"{key!r} is not a checkpoint key. A key looks like "
            f"'Flow/run/step/task/position/{ids.EXAMPLE}'; "
            "take it from CheckpointArtifact.key or current.checkpoint.list()."
        )
    flow, run, step, task, position, checkpoint_id = parts
    return TaskLocation(flow, run, step, task, position), checkpoint_id


def new_checkpoint_id(attempt: int) -> tuple[str, str]:
    """A fresh (checkpoint id, ISO-8601 created_on) pair, strictly increasing in this process."""
    return ids.new_id(attempt)


@dataclass(frozen=True)
class FieldEntry:
    """One saved attribute, as ``inspect()`` shows it: its type, the bytes it holds (its part of
    the pickle stream plus the buffers first reached through it), the other fields it shares
    objects with, and for tensors and arrays their shape, dtype and device. ``span`` and
    ``buffers`` locate it in the checkpoint's graph (``graph.py``)."""

    type: str
    size: int
    span: tuple = (0, 0)
    buffers: tuple = (0, 0)
    shares: tuple = ()
    shape: Optional[tuple] = None
    dtype: Optional[str] = None
    device: Optional[str] = None
    files: Optional[tuple] = None  # a Directory's [relative path, size] pairs
    skipped: Optional[tuple] = None  # ... and what it left out (links, special files)

    @classmethod
    def from_dict(cls, data: dict) -> "FieldEntry":
        known = cls.__dataclass_fields__
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class CheckpointArtifact:
    """A checkpoint as plain, serializable data (what ``save``, ``list`` and ``load`` return).

    ``created_on`` is ISO-8601 UTC with microseconds and ``Z``: the writer's clock, shown to
    people and never used to order checkpoints (``ids.py`` orders them).
    ``metadata`` is exactly the user's dict. ``parent`` is the key of the checkpoint this one
    descends from. ``written`` counts the bytes this save put in storage, its manifest
    included (unchanged payloads are not rewritten); ``url`` is where the manifest lives. ``resumed_from`` is the
    key of the checkpoint the saving attempt had loaded (``None`` if it loaded nothing), so
    lineage across attempts survives retention of intermediate saves. ``pinned`` is not stored
    in the manifest (manifests never change): ``list()`` fills it from the task's pins.
    ``step`` is the training step given to ``save(step=N)`` (``None``: none was given, as in
    every manifest written before steps existed).
    """

    key: str
    name: str
    pathspec: str
    attempt: int
    created_on: str
    metadata: dict = field(default_factory=dict)
    implicit_manifest: dict = field(default_factory=dict)
    size: int = 0
    parent: Optional[str] = None
    url: Optional[str] = None
    latest: bool = True
    namespace: Optional[str] = None
    written: int = 0
    save_seconds: float = 0.0
    resumed_from: Optional[str] = None
    pinned: bool = False
    step: Optional[int] = None

    @property
    def fields(self) -> dict[str, FieldEntry]:
        return {n: FieldEntry.from_dict(f) for n, f in self.implicit_manifest.get("fields", {}).items()}

    def payloads(self) -> list[tuple[str, int]]:
        """(hex digest, size) of every payload this checkpoint references: the pickle stream,
        then each buffer (format 1: one per field)."""
        m = self.implicit_manifest
        if m.get("version", 1) == 1:
            return [(f["hash"].partition(":")[2], f["size"]) for f in m.get("fields", {}).values()]
        return [(digest, size) for p in [m["body"], *m["buffers"]] for digest, size in chunks_of(p)]

    def payload_digests(self) -> set[str]:
        """Hex digests of every payload this checkpoint references (what gc keeps)."""
        return {digest for digest, _ in self.payloads()}

    def field_payloads(self, name: str) -> list[tuple[str, int]]:
        """(hex digest, size) of the chunks of the buffers first reached through field ``name``."""
        m = self.implicit_manifest
        owned = m["buffers"][slice(*m["fields"][name].get("buffers", (0, 0)))]
        return [(digest, size) for p in owned for digest, size in chunks_of(p)]

    @property
    def location(self) -> TaskLocation:
        return parse_key(self.key)[0]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CheckpointArtifact":
        try:
            return cls(**data)  # the common case: exactly our own to_dict()
        except TypeError:
            pass
        known = cls.__dataclass_fields__
        missing = [k for k in ("key", "name", "pathspec", "attempt", "created_on") if k not in data]
        if missing:
            raise CheckpointFormatError(
                f"Not a checkpoint: the dict lacks {missing}. Pass "
                "CheckpointArtifact.to_dict(), a CheckpointArtifact or its key."
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def with_url(self, url: str) -> "CheckpointArtifact":
        return replace(self, url=url)

    def _repr_html_(self) -> str:
        from .display import artifact_html

        return artifact_html(self)


_STORED = [name for name in CheckpointArtifact.__dataclass_fields__ if name not in ("url", "pinned")]


def manifest_bytes(artifact: CheckpointArtifact, sealer: Sealer, inline: Optional[dict] = None) -> bytes:
    """A manifest file, three lines:

    1. the checkpoint as JSON (the artifact minus ``url`` and ``pinned``, which are not part of
       it, plus the format stamp): all that listing a checkpoint parses;
    2. the small payloads kept inline (base64 by field name);
    3. the seal over the exact bytes of lines 1 and 2 (see ``signing``): checking it hashes a
       few kilobytes and re-serializes nothing.
    """
    body = {name: getattr(artifact, name) for name in _STORED}  # no deep copy: only serialized
    head = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **body}, sort_keys=True)
    sealed = f"{head}\n{json.dumps(inline or {})}".encode()
    return sealed + b"\n" + json.dumps(sealer.seal(sealed)).encode()


def read_manifest(data: bytes, url: str, sealer: Sealer, key: Optional[str]) -> CheckpointArtifact:
    """Parse the manifest of checkpoint ``key``; refuse anything that is not a manifest, is from
    a newer format, fails its seal, or claims to be another checkpoint than the one asked for
    (``key=None``: any checkpoint, as gc reads every manifest for what it references)."""
    sealed, _, seal = data.rpartition(b"\n")
    try:
        body = _loads(sealed.partition(b"\n")[0])
        seal = _loads(seal)
    except ValueError as exc:
        raise CheckpointCorrupt(f"The manifest at {url} is not valid JSON ({exc}).") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointFormatError(f"{url} is not a metaflow-implicit-checkpoint manifest.")
    version = body.pop("version", None)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"The checkpoint at {url} has format version {version!r}, newer than this "
            f"package reads ({FORMAT_VERSION}). Upgrade metaflow-implicit-checkpoint."
        )
    sealer.verify(sealed, seal, url)
    if key is not None and body.get("key") != key:
        # A correctly sealed manifest copied to another place is still not that checkpoint.
        raise CheckpointCorrupt(f"The manifest at {url} belongs to {body.get('key')!r}, not to {key}.")
    _check_shape(body, url)
    del body["format"]
    body["url"] = url
    if isinstance(body.get("written"), int):
        body["written"] += len(data)  # stored: the payload bytes; the manifest counts itself
    return CheckpointArtifact.from_dict(body)


def read_inline(data: bytes, url: str) -> dict:
    """The inline payloads of a manifest (its second line; the seal was checked with the first)."""
    try:
        return _loads(data.split(b"\n", 2)[1])
    except (ValueError, IndexError) as exc:
        raise CheckpointCorrupt(f"The manifest at {url} is not valid JSON ({exc}).") from exc


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)  # twice as fast as json: list() parses every manifest
    except orjson.JSONDecodeError:
        return json.loads(data)  # NaN and Infinity in user metadata, which orjson refuses


_SHAPE = {"name": str, "pathspec": str, "attempt": int, "created_on": str, "metadata": dict,
          "implicit_manifest": dict}


def _check_shape(body: dict, url: str) -> None:
    """A manifest anyone could have written (no secret set) fails here, not deep in a load."""
    bad = [k for k, t in _SHAPE.items() if not isinstance(body.get(k), t)]
    if not _step_ok(body.get("step")):
        bad.append("step")
    if not bad and not _fields_ok(body["implicit_manifest"]):
        bad = ["implicit_manifest.fields"]
    if bad:
        raise CheckpointCorrupt(f"The manifest at {url} is malformed: bad {', '.join(bad)}.")


def _step_ok(step: Any) -> bool:
    return step is None or (isinstance(step, int) and not isinstance(step, bool) and step >= 0)


_V1_KEYS = {"type", "size", "hash", "serializer"}
_V2_KEYS = {"type", "size", "span"}
_V2_OPTIONAL = {"buffers", "shares", "shape", "dtype", "device", "files", "skipped"}


def chunks_of(payload: list) -> list:
    """The ``[digest, size]`` chunks of a payload as a manifest lists it (format 2 stored each
    payload as one object: ``[digest, size]``)."""
    return [payload] if payload and isinstance(payload[0], str) else payload


def _fields_ok(manifest: dict) -> bool:
    """The field table and payload list have the shape of their format version (a cheap check:
    list() runs it on every manifest; the values are checked where they are used)."""
    fields = manifest.get("fields")
    try:
        if manifest.get("version", 1) == 1:
            return all(entry.keys() == _V1_KEYS for entry in fields.values())
        chunks = [c for p in (manifest["body"], *manifest["buffers"]) for c in chunks_of(p)]
        return all(len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], int) for c in chunks) and all(
            _V2_KEYS <= entry.keys() <= _V2_KEYS | _V2_OPTIONAL for entry in fields.values()
        )
    except (AttributeError, KeyError, TypeError):  # not a dict of dicts, no payload list
        return False
