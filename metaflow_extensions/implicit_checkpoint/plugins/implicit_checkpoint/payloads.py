"""Payloads: how a checkpoint's pickle stream and buffers are stored, and read back.

A checkpoint's payloads are its pickle stream and each out-of-band buffer (``graph.py``). Each
payload is cut into chunks of ``CHUNK`` bytes at fixed offsets, and each chunk is stored under
the hash of its bytes (xxh3-128; sha256 when manifests are signed). The manifest lists every
payload as its chunks, ``[[digest, size], ...]``: ``body`` (the stream), then ``buffers`` in
stream order.

Why fixed-size chunks: buffers (arrays, tensor storages, large strings and bytes, the runs of
long lists: see ``segments.py``) keep their layout from save to save, so an in-place change to
a 200 MB array rewrites only the chunks it touched and an appended string its last chunk; bytes
that shift (an appended list) are kept apart by the graph itself, which gives long lists their
own buffers. Fixed offsets cost nothing to find (content-defined boundaries would need a rolling
hash over every byte, in Python or a new dependency) and the hash of each chunk is computed as
fast as the whole payload's. 2 MiB keeps a change of one float under 4 MiB written while a 5 GB
model lists 2,500 chunks (about 100 KB of manifest).

Writing (``write``): hash each chunk; a payload up to ``INLINE_MAX`` bytes goes inside the
manifest (base64, keyed by digest); any other chunk is written as its own object unless the
store already has it (an unchanged chunk costs nothing, whichever attribute, task or run
stored it), a few at a time on remote stores.

Reading (``read``): each payload is read straight into a buffer of the size the sealed manifest
states, chunk after chunk into its place (one copy, storage to memory; nothing is allocated from
lengths read out of a payload), each chunk hashed on the way, concurrently on remote stores; a
chunk that is missing, shorter, longer or different is named, with the field that holds it, as
``CheckpointCorrupt``.
"""
from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from .exceptions import CheckpointCorrupt, CheckpointNotFound
from .manifest import CheckpointArtifact, chunks_of
from .store import HASHES, INLINE_MAX, CheckpointStore, content_hash

CHUNK = 2 << 20


def write(store: CheckpointStore, flow: str, parts: Sequence) -> tuple[dict, dict, int]:
    """Store the chunks of the payloads ``parts`` (the stream, then each buffer) that are new:
    returns the manifest's payload list, the inline payloads and the bytes written. A thread
    hashes the chunks ahead of the writes (both release the GIL)."""
    algorithm, inline, listed = store.hash_name, {}, []
    views = [memoryview(part).cast("B") for part in parts]
    chunks = [[v[i:i + CHUNK] for i in range(0, v.nbytes, CHUNK)] if v.nbytes > INLINE_MAX else [v] for v in views]
    with ThreadPoolExecutor(max_workers=1) as hashing:
        digests = hashing.map(lambda chunk: content_hash([chunk], algorithm), [c for cs in chunks for c in cs])
        objects, written = {}, 0
        for view, pieces in zip(views, chunks):
            listed.append([[next(digests), piece.nbytes] for piece in pieces])
            if view.nbytes <= INLINE_MAX:
                inline[listed[-1][0][0]] = base64.b64encode(view).decode()
                continue
            for (digest, _), piece in zip(listed[-1], pieces):
                if digest not in objects:  # a chunk twice in one save is written once
                    objects[digest] = piece
                    if store.is_local:  # written as soon as hashed; remote ones together below
                        written += store.put_object(flow, digest, [piece])
    if not store.is_local:
        written = sum(_put_all(store, flow, list(objects.items())))
    return {"hash": algorithm, "body": listed[0], "buffers": listed[1:]}, inline, written


def _put_all(store: CheckpointStore, flow: str, objects: list) -> list[int]:
    """Write chunks to a remote store a few at a time: each request waits on the network."""
    if len(objects) < 2:
        return [store.put_object(flow, digest, [part]) for digest, part in objects]
    with ThreadPoolExecutor(max_workers=min(8, len(objects))) as pool:
        return list(pool.map(lambda item: store.put_object(flow, item[0], [item[1]]), objects))


def read(store: CheckpointStore, artifact: CheckpointArtifact, inline: dict, needed: set) -> tuple[Any, list]:
    """The verified stream and buffers of a checkpoint (never-touched stand-ins for the
    buffers not ``needed``), chunks read concurrently from remote stores."""
    m = artifact.implicit_manifest
    algorithm = m.get("hash")
    if algorithm not in HASHES:
        raise CheckpointCorrupt(f"Checkpoint {artifact.key} uses hash {algorithm!r}, unknown here.")
    order = [-1, *sorted(needed)]  # -1: the stream
    payloads = [chunks_of(m["body"] if i < 0 else m["buffers"][i]) for i in order]
    found = [_new_buffer(sum(size for _, size in chunks)) for chunks in payloads]
    jobs = []  # (digest, size, where it goes)
    for chunks, buffer in zip(payloads, found):
        view, offset = _bytes_view(buffer), 0
        for digest, size in chunks:
            jobs.append((digest, size, view[offset:offset + size]))
            offset += size
    with ThreadPoolExecutor(max_workers=1) as hashing:  # hashes chunk i while i+1 is read
        one = lambda job: _read_one(store, artifact, inline, algorithm, hashing, *job)
        if store.is_local or len(jobs) < 2:
            list(map(one, jobs))
        else:
            with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:
                list(pool.map(one, jobs))
    by_index = dict(zip(order, found))
    buffers = [by_index[i] if i in by_index else _new_buffer(sum(s for _, s in chunks_of(p)))
               for i, p in enumerate(m["buffers"])]
    return by_index[-1], buffers


def _read_one(store: CheckpointStore, artifact: CheckpointArtifact, inline: dict, algorithm: str,
              hashing: ThreadPoolExecutor, digest: str, size: int, view: memoryview) -> None:
    """One chunk, read into its place (``view``, of the size the manifest states), hash verified."""
    hasher = HASHES[algorithm]()
    try:
        if digest in inline:
            data = base64.b64decode(inline[digest])
            ok = len(data) == size
            if ok:
                view[:] = data
                hasher.update(data)
        else:
            with store.open_object(artifact.location.flow, digest) as f:
                ok = _read_verified(f, view, hasher, hashing)
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


_READ = 16 << 20


def _read_verified(f, view: memoryview, hasher, hashing: ThreadPoolExecutor) -> bool:
    """Read exactly ``len(view)`` bytes into ``view``, 16 MiB at a time, while the ``hashing``
    thread hashes the part read before (both release the GIL), so verifying costs no time on
    top of reading. False if the chunk is shorter or longer than that."""
    hashed = None
    for i in range(0, len(view), _READ):
        part = view[i:i + _READ]
        if not _read_into(f, part):
            return False
        if hashed is not None:
            hashed.result()
        hashed = hashing.submit(hasher.update, part)
    if hashed is not None:
        hashed.result()
    return not f.read(1)


def _owner(artifact: CheckpointArtifact, digest: str) -> str:
    """``Field 'w'``: who holds a payload, for errors (the stream holds every field)."""
    m = artifact.implicit_manifest
    names = [n for n, f in m["fields"].items()
             if any(c[0] == digest for p in m["buffers"][slice(*f.get("buffers", (0, 0)))] for c in chunks_of(p))]
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
