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

On S3, Azure Blob, GCS and memory a manifest is put "create only" (``If-None-Match: *``; on
GCS ``ifGenerationMatch=0``), so a committed one is
never replaced; a retry finding equal bytes there knows its lost-answer put landed. Payloads are
put plainly: writers of one hash write the same bytes. Every call is retried through transient
faults and bounded in time (``retry.py``: a remote call gets ``CALL_SECONDS``, an upload one more
second per MiB); a failure is a ``CheckpointStorageError`` naming the URL.

A save references a payload that is already stored only while gc is sure to spare it (gc.py):
on a local disk it gives the payload a new mtime first; on object stores only if the payload is
younger than ``REUSE_SECONDS`` by the storage's clock (else it is written again, which makes it
young). What this process knows to exist is trusted no longer than that. Ages are measured with
the storage's clock (``now``), never the host's: the two may disagree by hours.

Locally, only regular files inside the root are read (``localfs.py``): a FIFO or a device where
a manifest or payload belongs is refused without blocking.

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
import stat
import time
import uuid
import warnings
from datetime import datetime
from typing import IO, Any, Callable, Iterable, Optional, Sequence

import fsspec
import xxhash

from . import ids
from .localfs import open_file, read_small_file
from .exceptions import (
    CheckpointConfigError,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointNotFound,
    CheckpointSaveError,
    CheckpointStorageError,
)
from .manifest import TaskLocation
from .retry import GaveUp, RetryPolicy, within
from .signing import Sealer

# xxh3-128 hashes at memory speed (~30 GB/s), so content addressing costs the save almost
# nothing; it detects corruption but is no defence against someone forging payloads.
HASHES = {"xxh128": xxhash.xxh3_128, "sha256": hashlib.sha256}
HASH_NAME = "xxh128"
INLINE_MAX = 4096
_LOCAL_PROTOCOLS = {"file", "local"}
_PROCESS_LOCAL = {"memory"}
# An atomic put-if-absent is implemented (S3 and Azure: If-None-Match: *; GCS: ifGenerationMatch=0)
_CREATE_ONLY_PROTOCOLS = {"s3", "s3a", "memory", "az", "abfs", "abfss", "gs", "gcs"}
_DIGEST_RE = re.compile(r"[0-9a-f]{32}(?:[0-9a-f]{32})?")  # xxh3-128 or sha256, hex
EMPTY_DIGEST = xxhash.xxh3_128(b"").hexdigest()
NOT_SAVED = " This checkpoint was not saved; earlier checkpoints are untouched."
# A put whose answer never came may still have landed: then the checkpoint is complete and listed.
MAYBE_SAVED = " Earlier checkpoints are untouched; this one is listed only if a try landed unanswered."
# A stored payload is referenced as it is only if it was written (or found written) less than
# this long ago by the storage's clock; gc's default grace (an hour) leaves a save 50 minutes.
REUSE_SECONDS = 600.0
CALL_SECONDS = 30.0  # longest wait for one remote call's answer (uploads: plus 1 s per MiB)
_UPLOAD_RATE = 1 << 20  # bytes per second an upload is granted on top of CALL_SECONDS


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
                "fsspec URL whose filesystem is installed (pip install "
                "'metaflow-implicit-checkpoint[s3]' for s3://, [azure] for abfs:// and az://, "
                "[gcs] for gs://)."
            ) from exc
        self.url = url.rstrip("/")
        protocol = self.fs.protocol
        protocols = {protocol} if isinstance(protocol, str) else set(protocol)
        self.is_local = bool(protocols & _LOCAL_PROTOCOLS)
        self.shared_across_processes = not protocols & _PROCESS_LOCAL
        self._create_only = bool(protocols & _CREATE_ONLY_PROTOCOLS)
        self.retry, self.sealer = retry, sealer
        self.retried = 0  # transient faults retried so far (reported by benchmarks)
        # payload hash -> storage time it was last known written (the payload is no older)
        self._known: dict[str, float] = {}
        self._clock_offset: Optional[float] = None  # storage clock minus this host's
        self._writable: set[str] = set()  # flows whose storage was found writable
        if "s3" in protocols:
            self.fs.retries = 1  # s3fs's own retry loop would outlast our deadline

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
        fresh._known, fresh._clock_offset = dict(self._known), self._clock_offset
        fresh._writable = set(self._writable)
        return fresh

    def known(self) -> dict[str, float]:
        """Payloads known to exist, with the storage time each was last known written."""
        return dict(self._known)

    def remember(self, known: dict[str, float]) -> None:
        """Note payloads another process found or wrote (its ``known()``), so they are not
        checked for again while they are young enough to reuse."""
        for digest, written in known.items():
            self._known[digest] = max(written, self._known.get(digest, written))

    # ----- the storage's clock -----------------------------------------------------------
    def now(self, flow: str) -> float:
        """The storage's time now (seconds since the epoch), by which stored objects age. It is
        measured once per store, from the mtime of an object written for it: a host whose own
        clock is off (a gc host an hour ahead) still ages objects right."""
        if self._clock_offset is None:
            self._probe(flow)
        return time.time() + self._clock_offset

    def _probe(self, flow: str) -> None:
        """Write the empty payload (a real object of the layout, so nothing foreign is left)
        and read back its mtime."""
        path = self._object_path(flow, EMPTY_DIGEST)
        where = f"Cannot write checkpoints under {self.url}"
        hint = (" Check the root URL, the credentials and the endpoint (METAFLOW_S3_ENDPOINT_URL for S3, "
                "METAFLOW_AZURE_STORAGE_BLOB_SERVICE_ENDPOINT for Azure).")
        before = time.time()
        self._io(where, lambda: self._write_whole(path, [b""]), hint)
        written = mtime_of(self._io(where, lambda: self.fs.info(path), hint))
        if written == int(written):
            written += 1.0  # S3 truncates times to the second: ages may be a second long, never short
        offset = written - (before + time.time()) / 2 if self.shared_across_processes else 0.0
        # Under a second apart is one clock read at different resolutions (a local disk stamps
        # files with a coarse clock): no offset, so a file just written is never "from the future".
        self._clock_offset = offset if abs(offset) >= 1.0 else 0.0
        self._writable.add(flow)
        self._known[EMPTY_DIGEST] = written

    # ----- paths -------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _object_path(self, flow: str, digest: str) -> str:
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):  # a hostile manifest must not steer reads elsewhere
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
        path = self._object_path(flow, digest)
        where = f"Could not write payload {self._url(path)}"
        if self._reusable(flow, digest, path, where):
            return 0
        size = sum(memoryview(p).nbytes for p in parts)
        timeout = CALL_SECONDS + size / _UPLOAD_RATE
        self._io(where, lambda: self._write_whole(path, parts), NOT_SAVED, timeout=timeout)
        self._known[digest] = self.now(flow)
        return size

    def _reusable(self, flow: str, digest: str, path: str, where: str) -> bool:
        """Whether the stored payload can be referenced as it is: only while gc is sure to
        spare it (see the module docstring and gc.py)."""
        if self.is_local:
            return self._freshen(path)  # one syscall, and the payload is young again
        now = self.now(flow)
        if now - self._known.get(digest, -REUSE_SECONDS) < REUSE_SECONDS:
            return True
        try:
            written = mtime_of(self._io(where, lambda: self.fs.info(path), NOT_SAVED, missing_ok=True))
        except FileNotFoundError:
            return False
        if now - written >= REUSE_SECONDS:
            return False  # old: gc may be about to delete it; write it again instead
        self._known[digest] = written
        return True

    def open_object(self, flow: str, digest: str) -> IO[bytes]:
        """A payload to read: the file itself on a local disk (read straight into place),
        else its bytes fetched whole, so a transient fault is retried, not met mid-stream."""
        path = self._object_path(flow, digest)
        try:
            if self.is_local:
                return open_file(path, self.root)
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
            if self.is_local:
                data = read_small_file(path, self.root)
                if data is None:
                    raise FileNotFoundError(path)
                return data
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
                try:
                    yield checkpoint_id, read_small_file(path, self.root)
                except CheckpointCorrupt as exc:
                    warnings.warn(f"Skipping checkpoint {loc.key(checkpoint_id)}: {exc}")
                    yield checkpoint_id, None
            return
        found = self._read(self._url(folder), lambda: self.fs.cat(paths, on_error="return")) if paths else {}
        for checkpoint_id, path in zip(ids, paths):
            data = found.get(path)
            yield checkpoint_id, data if isinstance(data, bytes) else None

    def task_url(self, loc: TaskLocation) -> str:
        """URL of the folder holding a task's manifests (a manifest is ``<id>.json`` in it)."""
        return self.fs.unstrip_protocol(self._task_dir(loc))

    def list_task(self, loc: TaskLocation) -> list[str]:
        """Checkpoint ids of one task (all attempts), oldest first (``ids.task_order``: by attempt,
        then by the logical clock; never by a wall clock). Seeing them advances this process's
        logical clock past them."""
        return ids.in_task_order(self._names(self._ls(self._task_dir(loc))))

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
            if len(rel) == 3 and rel[2].endswith(".json") and ids.is_id(rel[2][:-5]):
                run, task, name = rel
                found.append((TaskLocation(flow, run, step, task, position), name[:-5]))
        ids.observe(i for _, i in found)
        return sorted(found, key=lambda item: ids.run_order(item[1], item[0].run))

    def check_writable(self, flow: str) -> None:
        """Fail now, naming the root, if it cannot be written (no such bucket, no access, an
        unreachable endpoint), rather than in the middle of a save. Once per flow and process.

        It writes the empty payload: a real object of the layout, so nothing foreign is left.
        """
        if flow not in self._writable:
            self._probe(flow)  # also reads the storage's clock

    # ----- internals ---------------------------------------------------------------------
    def _read(self, path: str, call: Callable[[], Any]) -> Any:
        """A read: something missing raises FileNotFoundError, for the caller to interpret."""
        return self._io(f"Could not read {self._url(path)}", call, missing_ok=True)

    def _io(
        self, what: str, call: Callable[[], Any], hint: str = "", missing_ok: bool = False,
        timeout: float = CALL_SECONDS,
    ) -> Any:
        """One storage call, retried through transient faults, each try bounded by ``timeout``
        (remote stores); a failure names the URL."""
        if not self.is_local and self.shared_across_processes:
            call = functools.partial(within, timeout, call)
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

    def _names(self, paths: Iterable[str]) -> Iterable[str]:
        """What may be checkpoint ids: names of ``.json`` entries, without the suffix."""
        for path in paths:
            name = path if self.is_local else posixpath.basename(path.rstrip("/"))
            if name.endswith(".json"):
                yield name[:-5]

    def _write_whole(self, path: str, parts: Sequence) -> None:
        if not self.is_local:
            with self.fs.open(path, "wb") as f:  # the object appears when the upload completes
                for part in parts:
                    f.write(part)
            return
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            try:  # unbuffered: big views go straight to the OS
                f = open(tmp, "wb", buffering=0)
            except FileNotFoundError:  # its folder is new (or gc removed it)
                self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
                f = open(tmp, "wb", buffering=0)
            with f:
                for part in parts:
                    _write_all(f, part)
            try:
                self.fs.mv(tmp, path)  # rename: atomic on POSIX
            except FileNotFoundError:
                if os.path.isdir(posixpath.dirname(path)):
                    raise CheckpointSaveError(
                        f"The temporary file {tmp} vanished before it was renamed into place: "
                        "something deleted it while it was being written (gc run with a grace "
                        "period shorter than this save took, such as `gc --grace 0`?)." + NOT_SAVED
                    ) from None
                raise
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
        """Give a reused local payload a new mtime, so gc's grace period protects it like a new
        one (as git freshens reused objects); False if it vanished meanwhile (gc moves a payload
        away before deleting it, so this and gc's last look cannot cross: see gc.py), or if
        something other than a regular file sits there (it is then written over)."""
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return False
            os.utime(path, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    # ----- one door for the lifecycle modules: retried, bounded, naming the URL ----------
    def exists(self, path: str) -> bool:
        return self._io(f"Could not look up {self._url(path)}", lambda: self.fs.exists(path))

    def touch(self, path: str) -> None:
        """An empty marker object (its name and time are what matter)."""
        def put() -> None:
            if self.is_local:
                os.makedirs(posixpath.dirname(path), exist_ok=True)
            self.fs.pipe_file(path, b"")
        self._io(f"Could not write {self._url(path)}", put)

    def info(self, path: str) -> dict:
        """An object's listing entry; FileNotFoundError if there is none."""
        return self._read(path, lambda: self.fs.info(path))

    def ls_detail(self, path: str) -> list[dict]:
        """The listing entries of a folder (FileNotFoundError if there is none)."""
        return self._read(path, lambda: self.fs.ls(path, detail=True))

    def find(self, base: str) -> dict[str, dict]:
        """Every object under ``base`` with its listing entry ({} if there is none)."""
        try:
            return self._read(base, lambda: self.fs.find(base, detail=True))
        except FileNotFoundError:
            return {}

    def ages_in(self, flow: str, path: str) -> dict[str, float]:
        """Name -> age in seconds (by the storage's clock) of the entries of a folder."""
        try:
            entries = self.ls_detail(path)
        except FileNotFoundError:
            return {}
        now = self.now(flow)
        return {posixpath.basename(e["name"].rstrip("/")): now - mtime_of(e) for e in entries}

    def cat_many(self, paths: list[str]) -> dict[str, Any]:
        """path -> bytes, or the exception met reading it (FileNotFoundError if gone)."""
        if not self.is_local:
            return self._read(self.root, lambda: self.fs.cat(paths, on_error="return"))
        found: dict[str, Any] = {}
        for path in paths:
            try:
                data = read_small_file(path, self.root)
                found[path] = FileNotFoundError(path) if data is None else data
            except (OSError, CheckpointError) as exc:
                found[path] = exc
        return found

    def delete_many(self, paths: list[str]) -> None:
        """Delete objects (one request on object stores); missing ones are fine."""
        def rm() -> None:
            try:
                self.fs.rm(paths)
            except FileNotFoundError:
                for path in paths:
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(path)
        if paths:
            self._io(f"Could not delete under {self.url}", rm)


def mtime_of(info: dict) -> float:
    """When an object was last written, from an fsspec listing entry (backends name it
    differently); unknown counts as now, so nothing is deleted early."""
    for field in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(field)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and value:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return time.time()


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
