"""Payloads: how a checkpoint's pickle stream and buffers are stored, and read back.

A checkpoint's payloads are its pickle stream and each out-of-band buffer (``graph.py``), each
addressed by the hash of its bytes (xxh3-128; sha256 when manifests are signed). The manifest
lists them as ``[digest, size]``: ``body`` (the stream), then ``buffers`` in stream order.

Writing (``write``): hash each payload; those up to ``INLINE_MAX`` bytes go inside the manifest
(base64, keyed by digest); any other is written as its own object unless the store already has
it (an unchanged tensor or array costs nothing), a few at a time on remote stores.

Reading (``read``): each payload is read straight into a buffer of the size the sealed manifest
states (one copy, storage to memory; nothing is allocated from lengths read out of a payload)
and hashed on the way; a payload that is missing, shorter, longer or different is named, with
the field that holds it, as ``CheckpointCorrupt``.
"""
from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from .exceptions import CheckpointCorrupt, CheckpointNotFound
from .manifest import CheckpointArtifact
from .store import HASHES, INLINE_MAX, CheckpointStore, content_hash


def write(store: CheckpointStore, flow: str, parts: Sequence) -> tuple[dict, dict, int]:
    """Store the payloads ``parts`` (the stream, then each buffer) that are new: returns the
    manifest's payload list, the inline payloads and the bytes written."""
    algorithm, inline, objects, listed = store.hash_name, {}, {}, []
    for part in parts:
        digest, size = content_hash([part], algorithm), memoryview(part).nbytes
        listed.append([digest, size])
        if size <= INLINE_MAX:
            inline[digest] = base64.b64encode(part).decode()
        else:
            objects[digest] = part  # a buffer twice in one graph is written once
    written = sum(_put_all(store, flow, list(objects.items())))
    return {"hash": algorithm, "body": listed[0], "buffers": listed[1:]}, inline, written


def _put_all(store: CheckpointStore, flow: str, objects: list) -> list[int]:
    """Write payloads: one after another on a local disk (it gains nothing from more), a few
    at a time on remote stores, where each request waits on the network."""
    if store.is_local or len(objects) < 2:
        return [store.put_object(flow, digest, [part]) for digest, part in objects]
    with ThreadPoolExecutor(max_workers=min(8, len(objects))) as pool:
        return list(pool.map(lambda item: store.put_object(flow, item[0], [item[1]]), objects))


def read(store: CheckpointStore, artifact: CheckpointArtifact, inline: dict, needed: set) -> tuple[Any, list]:
    """The verified stream and buffers of a checkpoint (never-touched stand-ins for the
    buffers not ``needed``), read concurrently from remote stores."""
    m = artifact.implicit_manifest
    algorithm = m.get("hash")
    if algorithm not in HASHES:
        raise CheckpointCorrupt(f"Checkpoint {artifact.key} uses hash {algorithm!r}, unknown here.")
    order = [-1, *sorted(needed)]  # -1: the stream
    wanted = [m["body"] if i < 0 else m["buffers"][i] for i in order]
    with ThreadPoolExecutor(max_workers=1) as hashing:  # hashes chunk i while i+1 is read
        one = lambda payload: _read_one(store, artifact, inline, algorithm, hashing, *payload)
        if store.is_local or len(wanted) < 2:
            found = list(map(one, wanted))
        else:
            with ThreadPoolExecutor(max_workers=min(8, len(wanted))) as pool:
                found = list(pool.map(one, wanted))
    by_index = dict(zip(order, found))
    buffers = [by_index[i] if i in by_index else _new_buffer(size) for i, (_, size) in enumerate(m["buffers"])]
    return by_index[-1], buffers


def _read_one(store: CheckpointStore, artifact: CheckpointArtifact, inline: dict, algorithm: str,
              hashing: ThreadPoolExecutor, digest: str, size: int) -> Any:
    """One payload, read into a buffer of the size the manifest states, hash verified."""
    hasher = HASHES[algorithm]()
    buffer = _new_buffer(size)
    try:
        if digest in inline:
            data = base64.b64decode(inline[digest])
            ok = len(data) == size
            if ok:
                _bytes_view(buffer)[:] = data
                hasher.update(data)
        else:
            with store.open_object(artifact.location.flow, digest) as f:
                ok = _read_verified(f, _bytes_view(buffer), hasher, hashing)
    except CheckpointNotFound:
        raise CheckpointCorrupt(
            f"{_owner(artifact, digest)} of checkpoint {artifact.key} is missing its payload "
            f"({algorithm}:{digest}). Load an earlier checkpoint (see list())."
        ) from None
    except (ValueError, TypeError):  # inline bytes that are not base64
        ok = False
    if not ok or hasher.hexdigest() != digest:
        raise CheckpointCorrupt(
            f"{_owner(artifact, digest)} of checkpoint {artifact.key} does not match its hash "
            f"{algorithm}:{digest} (or its size): the stored bytes were damaged. Load an "
            "earlier checkpoint (see list())."
        )
    return buffer


_CHUNK = 16 << 20


def _read_verified(f, view: memoryview, hasher, hashing: ThreadPoolExecutor) -> bool:
    """Read exactly ``len(view)`` bytes into ``view``, 16 MiB at a time, while the ``hashing``
    thread hashes the chunk read before (both release the GIL), so verifying costs no time on
    top of reading. False if the payload is shorter or longer than that."""
    hashed = None
    for i in range(0, len(view), _CHUNK):
        chunk = view[i:i + _CHUNK]
        if not _read_into(f, chunk):
            return False
        if hashed is not None:
            hashed.result()
        hashed = hashing.submit(hasher.update, chunk)
    if hashed is not None:
        hashed.result()
    return not f.read(1)


def _owner(artifact: CheckpointArtifact, digest: str) -> str:
    """``Field 'w'``: who holds a payload, for errors (the stream holds every field)."""
    m = artifact.implicit_manifest
    names = [n for n, f in m["fields"].items() if any(p[0] == digest for p in m["buffers"][slice(*f.get("buffers", (0, 0)))])]
    return f"Field {', '.join(map(repr, names))}" if names else f"The object graph (fields {', '.join(map(repr, m['fields']))})"


def _bytes_view(buffer) -> memoryview:
    return memoryview(buffer).cast("B")


def _read_into(f, view: memoryview) -> bool:
    while view:
        n = f.readinto(view)
        if not n:
            return False  # truncated
        view = view[n:]
    return True


def _new_buffer(size: int):
    try:  # numpy's allocator uses huge pages where it can: much faster to fill than bytearray
        import numpy

        return numpy.empty(size, dtype=numpy.uint8)
    except ImportError:
        return bytearray(size)
