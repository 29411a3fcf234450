"""Checkpoint storage on any fsspec filesystem, and the commit point.

Layout under the root URL::

    <root>/
      <flow>/
        objects/<h[:2]>/<h>                     one payload per distinct content (h = xxh3-128),
                                                shared by every run, step and task of the flow
        steps/<step>/<position>/<run>/<task>/
          <checkpoint id>.json                  one manifest per checkpoint (the commit point)
          pins/<checkpoint id>                  empty markers: pinned, and retired (deleted,
          retired/<checkpoint id>               purged after a grace period); see marks.py

Write order for a checkpoint: every payload first, then its manifest. A checkpoint exists for
readers exactly when its manifest exists, so a crash at any instant leaves either the complete
checkpoint or no manifest at all (only unreferenced payloads, which are harmless).

Each object is written whole or not at all: on a local disk into a temporary name that is then
renamed (atomic on POSIX); on memory and object stores the object appears when its (single or
multipart) upload completes. A payload's name is its hash, so a payload that exists is complete
and never needs rewriting. Payloads up to ``INLINE_MAX`` bytes live inside their manifest
instead, so a save of small attributes writes one object.

On S3 and memory a manifest is put "create only" (``If-None-Match: *``), so a committed one is
never replaced; a retry finding equal bytes there knows its lost-answer put landed. Payloads are
put plainly: writers of one hash write the same bytes. Every call is retried through transient
faults (``retry.py``); a failure is a ``CheckpointStorageError`` naming the URL.

Listing a task's checkpoints lists one directory; finding the newest checkpoint of a foreach
position across runs lists that position's folder, not the whole store.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import posixpath
import re
import time
import uuid
from typing import IO, Any, Callable, Iterable, Optional, Sequence

import fsspec
import xxhash

from .exceptions import (
    CheckpointConfigError,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointNotFound,
    CheckpointSaveError,
    CheckpointStorageError,
)
from .manifest import TaskLocation
from .retry import GaveUp, RetryPolicy
from .signing import Sealer

# xxh3-128 hashes at memory speed (~30 GB/s), so content addressing costs the save almost
# nothing; it detects corruption but is no defence against someone forging payloads.
HASHES = {"xxh128": xxhash.xxh3_128, "sha256": hashlib.sha256}
HASH_NAME = "xxh128"
INLINE_MAX = 4096
_LOCAL_PROTOCOLS = {"file", "local"}
_PROCESS_LOCAL = {"memory"}
_CREATE_ONLY_PROTOCOLS = {"s3", "s3a", "memory"}  # an atomic put-if-absent is implemented
_DIGEST_RE = re.compile(r"^[0-9a-f]{32}(?:[0-9a-f]{32})?$")  # xxh3-128 or sha256, hex
EMPTY_DIGEST = xxhash.xxh3_128(b"").hexdigest()
NOT_SAVED = " This checkpoint was not saved; earlier checkpoints are untouched."
# A put whose answer never came may still have landed: then the checkpoint is complete and listed.
MAYBE_SAVED = " Earlier checkpoints are untouched; this one is listed only if a try landed unanswered."
# Payloads known to exist are checked again after this long, so a long task never trusts a
# payload that gc (whose default grace period is an hour) may have deleted meanwhile.
KNOWN_TTL = 600.0


def content_hash(parts: Sequence, algorithm: str = HASH_NAME) -> str:
    h = HASHES[algorithm]()
    for part in parts:
        h.update(part)
    return h.hexdigest()


class CheckpointStore:
    """Reads and writes payloads and manifests under one fsspec root URL."""

    def __init__(
        self,
        url: str,
        storage_options: Optional[dict] = None,
        *,
        retry: RetryPolicy = RetryPolicy(),
        sealer: Sealer = Sealer(),
    ):
        self._options = dict(storage_options or {})
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **self._options)
        except (ImportError, ValueError) as exc:
            raise CheckpointConfigError(
                f"Cannot open checkpoint storage {url!r}: {exc}. Use a local path or an "
                "fsspec URL whose filesystem is installed (for s3://, "
                "pip install 'metaflow-implicit-checkpoint[s3]')."
            ) from exc
        self.url = url.rstrip("/")
        protocol = self.fs.protocol
        protocols = {protocol} if isinstance(protocol, str) else set(protocol)
        self.is_local = bool(protocols & _LOCAL_PROTOCOLS)
        self.shared_across_processes = not protocols & _PROCESS_LOCAL
        self._create_only = bool(protocols & _CREATE_ONLY_PROTOCOLS)
        self.retry, self.sealer = retry, sealer
        self.retried = 0  # transient faults retried so far (reported by benchmarks)
        self._known: set[str] = set()  # payload hashes seen present, to skip existence checks
        self._known_since = time.monotonic()
        self._writable: set[str] = set()  # flows whose storage was found writable

    @property
    def hash_name(self) -> str:
        """How payloads are addressed: xxh3-128, or sha256 when manifests are signed (a signed
        manifest must pin its payloads' bytes, which a non-cryptographic hash cannot)."""
        return "sha256" if self.sealer.key() else HASH_NAME

    def reopened(self) -> "CheckpointStore":
        """The same store with a filesystem of its own, for use in a forked child process."""
        if self.is_local:
            return self
        options = {**self._options, "skip_instance_cache": True}
        fresh = CheckpointStore(self.url, options, retry=self.retry, sealer=self.sealer)
        fresh._known, fresh._known_since = set(self._known), self._known_since
        fresh._writable = set(self._writable)
        return fresh

    def remember(self, digests: Iterable[str]) -> None:
        """Note payloads another process wrote, so they are not checked for again."""
        self._known.update(digests)

    # ----- paths -------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _object_path(self, flow: str, digest: str) -> str:
        if not _DIGEST_RE.match(digest):  # a hostile manifest must not steer reads elsewhere
            raise CheckpointCorrupt(f"{digest!r} is not a payload digest.")
        return self._path(flow, "objects", digest[:2], digest)

    def _url(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def _task_dir(self, loc: TaskLocation) -> str:
        return self._path(loc.flow, "steps", loc.step, loc.position, loc.run, loc.task)

    def manifest_url(self, loc: TaskLocation, checkpoint_id: str) -> str:
        return self.fs.unstrip_protocol(self._manifest_path(loc, checkpoint_id))

    def _manifest_path(self, loc: TaskLocation, checkpoint_id: str) -> str:
        return posixpath.join(self._task_dir(loc), checkpoint_id + ".json")

    # ----- payloads ----------------------------------------------------------------------
    def put_object(self, flow: str, digest: str, parts: Sequence) -> int:
        """Store a payload (written part after part, no joining copy) under its hash unless
        present; return the bytes written."""
        if time.monotonic() - self._known_since > KNOWN_TTL:
            self._known, self._known_since = set(), time.monotonic()
        if digest in self._known:
            return 0
        path = self._object_path(flow, digest)
        where = f"Could not write payload {self._url(path)}"
        if self._io(where, lambda: self.fs.exists(path), NOT_SAVED) and self._freshen(path):
            self._known.add(digest)
            return 0
        self._io(where, lambda: self._write_whole(path, parts), NOT_SAVED)
        self._known.add(digest)
        return sum(memoryview(p).nbytes for p in parts)

    def open_object(self, flow: str, digest: str) -> IO[bytes]:
        """A payload to read: the file itself on a local disk (read straight into place),
        else its bytes fetched whole, so a transient fault is retried, not met mid-stream."""
        path = self._object_path(flow, digest)
        try:
            if self.is_local:
                return open(path, "rb", buffering=0)  # reads go straight into the buffers
            return io.BytesIO(self._read(path, lambda: self.fs.cat_file(path)))
        except FileNotFoundError:
            raise CheckpointNotFound(f"payload {digest} is missing from {self.url}") from None

    # ----- manifests ---------------------------------------------------------------------
    def put_manifest(self, loc: TaskLocation, checkpoint_id: str, data: bytes) -> str:
        """The commit point: once this returns, the checkpoint is visible and loadable."""
        path = self._manifest_path(loc, checkpoint_id)
        write = self._create if self._create_only else self._write_whole
        self._io(f"Could not write manifest {self._url(path)}", lambda: write(path, [data]), MAYBE_SAVED)
        return self._url(path)

    def get_manifest(self, loc: TaskLocation, checkpoint_id: str) -> bytes:
        path = self._manifest_path(loc, checkpoint_id)
        try:
            return self._read(path, lambda: self.fs.cat_file(path))
        except FileNotFoundError:
            raise CheckpointNotFound(
                f"No checkpoint {loc.key(checkpoint_id)} under {self.url}."
            ) from None

    def get_manifests(self, loc: TaskLocation, ids: list[str]) -> Iterable[tuple[str, Optional[bytes]]]:
        """(id, manifest bytes or None if gone) for several checkpoints of one task; remote
        stores fetch them concurrently."""
        folder = self._task_dir(loc)
        paths = [f"{folder}/{i}.json" for i in ids]
        if self.is_local:
            for checkpoint_id, path in zip(ids, paths):
                yield checkpoint_id, _read_small_file(path)
            return
        found = self._read(self._url(folder), lambda: self.fs.cat(paths, on_error="return")) if paths else {}
        for checkpoint_id, path in zip(ids, paths):
            data = found.get(path)
            yield checkpoint_id, data if isinstance(data, bytes) else None

    def task_url(self, loc: TaskLocation) -> str:
        """URL of the folder holding a task's manifests (a manifest is ``<id>.json`` in it)."""
        return self.fs.unstrip_protocol(self._task_dir(loc))

    def list_task(self, loc: TaskLocation) -> list[str]:
        """Checkpoint ids of one task (all attempts), oldest first."""
        return sorted(self._ids(self._ls(self._task_dir(loc))))

    def list_position(self, flow: str, step: str, position: str) -> list[tuple[TaskLocation, str]]:
        """(location, checkpoint id) of every checkpoint of a foreach position, all runs."""
        base = self._path(flow, "steps", step, position)
        try:
            paths = self._read(base, lambda: self.fs.find(base))
        except FileNotFoundError:
            paths = []
        found = []
        for path in paths:
            rel = posixpath.relpath(path, base).split("/")
            if len(rel) == 3 and rel[2].endswith(".json"):
                run, task, name = rel
                found.append((TaskLocation(flow, run, step, task, position), name[:-5]))
        return sorted(found, key=lambda item: item[1])

    def check_writable(self, flow: str) -> None:
        """Fail now, naming the root, if it cannot be written (no such bucket, no access, an
        unreachable endpoint), rather than in the middle of a save. Once per flow and process.

        It writes the empty payload: a real object of the layout, so nothing foreign is left.
        """
        if flow in self._writable:
            return
        path = self._object_path(flow, EMPTY_DIGEST)
        self._io(
            f"Cannot write checkpoints under {self.url}",
            lambda: self._write_whole(path, [b""]),
            " Check the root URL, the credentials and, for S3, the endpoint (METAFLOW_S3_ENDPOINT_URL).",
        )
        self._writable.add(flow)
        self._known.add(EMPTY_DIGEST)

    # ----- internals ---------------------------------------------------------------------
    def _read(self, path: str, call: Callable[[], Any]) -> Any:
        """A read: something missing raises FileNotFoundError, for the caller to interpret."""
        return self._io(f"Could not read {self._url(path)}", call, missing_ok=True)

    def _io(self, what: str, call: Callable[[], Any], hint: str = "", missing_ok: bool = False) -> Any:
        """One storage call, retried through transient faults; a failure names the URL."""
        try:
            return self.retry.call(call, on_retry=self._count_retry)
        except CheckpointError:
            raise
        except FileNotFoundError:
            if missing_ok:
                raise
            raise CheckpointStorageError(f"{what}: the bucket or folder does not exist.{hint}") from None
        except GaveUp as exc:
            raise CheckpointStorageError(f"{what}: {exc}.{hint}") from exc.last
        except Exception as exc:
            raise CheckpointStorageError(f"{what}: {type(exc).__name__}: {exc}.{hint}") from exc

    def _count_retry(self, exc: BaseException) -> None:
        self.retried += 1

    def _ls(self, path: str) -> list[str]:
        try:
            if self.is_local:  # os.listdir: a tenth of the cost of fs.ls for a big folder
                return os.listdir(path)
            return self._read(path, lambda: self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    @staticmethod
    def _ids(paths: Iterable[str]) -> Iterable[str]:
        for path in paths:
            name = posixpath.basename(path.rstrip("/"))
            if name.endswith(".json"):
                yield name[:-5]

    def _write_whole(self, path: str, parts: Sequence) -> None:
        if not self.is_local:
            with self.fs.open(path, "wb") as f:  # the object appears when the upload completes
                for part in parts:
                    f.write(part)
            return
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb", buffering=0) as f:  # unbuffered: big views go straight to the OS
                for part in parts:
                    _write_all(f, part)
            self.fs.mv(tmp, path)  # rename: atomic on POSIX
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # plainly: a failing cleanup must not hide the original error
            raise

    def _create(self, path: str, parts: Sequence) -> None:
        """Put the bytes unless ``path`` exists; existing equal bytes are our own earlier put."""
        data = b"".join(parts)
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            if self.fs.cat_file(path) != data:
                raise CheckpointSaveError(
                    f"{self._url(path)} already holds another checkpoint; nothing was overwritten."
                    + NOT_SAVED
                ) from None

    # ----- for the lifecycle modules (marks.py, gc.py) -----------------------------------
    def task_path(self, loc: TaskLocation) -> str:
        """Path (without protocol) of the folder holding a task's manifests."""
        return self._task_dir(loc)

    def flow_path(self, flow: str) -> str:
        """Path (without protocol) of everything stored for one flow."""
        return self._path(flow)

    def names_in(self, path: str) -> list[str]:
        """Names of the entries of a folder ([] if there is none), listed as fast as list_task."""
        if self.is_local:
            return self._ls(path)  # os.listdir: names already
        return [posixpath.basename(p.rstrip("/")) for p in self._ls(path)]

    def _freshen(self, path: str) -> bool:
        """Give a reused payload a new mtime, so gc's grace period protects it like a new one
        (as git freshens reused objects); False if it vanished meanwhile. Object stores cannot
        touch an object cheaply, so there only the payload's age counts (see README, gc)."""
        if not self.is_local:
            return True
        try:
            os.utime(path)
            return True
        except FileNotFoundError:
            return False


def _read_small_file(path: str) -> Optional[bytes]:
    """A whole (small) file in one read, or None if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, 1 << 16)
        if len(data) < 1 << 16:
            return data  # a manifest, nearly always: one read
        chunks = [data]
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write_all(f, part) -> None:
    view = memoryview(part).cast("B")
    while view:  # one write() moves at most ~2 GiB on Linux
        view = view[f.write(view):]


@functools.lru_cache(maxsize=None)
def open_store(url: str) -> CheckpointStore:
    """One store per URL and process, so payloads known to exist are not checked twice.

    How to reach the storage and how long to retry come from Metaflow's configuration.
    """
    from .storage_options import retry_policy, storage_options

    return CheckpointStore(url, storage_options(url), retry=retry_policy())
