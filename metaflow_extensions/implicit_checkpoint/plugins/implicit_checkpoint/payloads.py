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
    returns the manifest's payload list, the inline payloads and the bytes written. This thread
    hashes chunk after chunk while writer threads (one on a local disk, eight on remote stores)
    write those hashed before: a write releases the GIL for its whole system call."""
    algorithm, inline, listed, seen = store.hash_name, {}, [], set()
    with ThreadPoolExecutor(max_workers=1 if store.is_local else 8) as writers:
        puts = []
        for part in parts:
            view = memoryview(part).cast("B")
            if view.nbytes <= INLINE_MAX:
                digest = content_hash([view], algorithm)
                inline[digest] = base64.b64encode(view).decode()
                listed.append([[digest, view.nbytes]])
                continue
            listed.append([])
            for i in range(0, view.nbytes, CHUNK):
                piece = view[i:i + CHUNK]
                digest = content_hash([piece], algorithm)
                listed[-1].append([digest, piece.nbytes])
                if digest not in seen:  # a chunk twice in one save is written once
                    seen.add(digest)
                    puts.append(writers.submit(store.put_object, flow, digest, [piece]))
        written = sum(put.result() for put in puts)
    return {"hash": algorithm, "body": listed[0], "buffers": listed[1:]}, inline, written


def read(store: CheckpointStore, artifact: CheckpointArtifact, inline: dict, needed: set) -> tuple[Any, list]:
    """The verified stream and buffers of a checkpoint (never-touched stand-ins for the
    buffers not ``needed``). Reader threads (one on a local disk, eight on remote stores) read
    each chunk into its place while this thread checks the hashes of those already read."""
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
    with ThreadPoolExecutor(max_workers=1 if store.is_local else 8) as readers:
        reads = [readers.submit(_fetch, store, artifact, inline, *job) for job in jobs]
        try:
            for (digest, size, view), done in zip(jobs, reads):
                if not done.result() or content_hash([view], algorithm) != digest:
                    raise CheckpointCorrupt(
                        f"{_owner(artifact, digest)} of checkpoint {artifact.key} does not match its hash "
                        f"{algorithm}:{digest} (or its size): the stored bytes were damaged. Load an "
                        "earlier checkpoint (see list())."
                    )
        finally:
            for pending in reads:
                pending.cancel()
    by_index = dict(zip(order, found))
    buffers = [by_index[i] if i in by_index else _new_buffer(sum(s for _, s in chunks_of(p)))
               for i, p in enumerate(m["buffers"])]
    return by_index[-1], buffers


def _fetch(store: CheckpointStore, artifact: CheckpointArtifact, inline: dict, digest: str, size: int,
           view: memoryview) -> bool:
    """Read one chunk into its place (``view``, of the size the manifest states); False if it
    is shorter or longer than that."""
    try:
        if digest in inline:
            data = base64.b64decode(inline[digest])
            if len(data) != size:
                return False
            view[:] = data
            return True
        with store.open_object(artifact.location.flow, digest) as f:
            return _read_into(f, view) and not f.read(1)
    except CheckpointNotFound:
        raise CheckpointCorrupt(
            f"{_owner(artifact, digest)} of checkpoint {artifact.key} is missing its payload "
            f"({artifact.implicit_manifest.get('hash')}:{digest}). Load an earlier checkpoint (see list())."
        ) from None
    except (ValueError, TypeError):  # inline bytes that are not base64
        return False


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
