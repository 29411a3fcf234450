"""Pins and tombstones: empty marker objects beside a task's manifests.

    steps/<step>/<position>/<run>/<task>/
      <checkpoint id>.json          the manifest (never changes once written)
      pins/<checkpoint id>          pinned: retention never retires it
      retired/<checkpoint id>       deleted: hidden from list() and from resuming, still
                                    loadable by key until it is purged

Manifests are immutable, so these states live in objects of their own. Deletion has two
phases, so a reader that listed a checkpoint a moment ago can still load it: ``retire`` writes
a tombstone, and only once the tombstone is older than the grace period does ``purge`` remove
the manifest, then the tombstone. A pin wins over a tombstone (a checkpoint pinned while it was
being retired is un-retired at purge time). Payloads are never removed here: gc.py removes them
by reachability over the whole flow.
"""
from __future__ import annotations

import posixpath
from typing import Iterable

from .exceptions import CheckpointNotFound, CheckpointPinned
from .manifest import TaskLocation, parse_key
from .ids import task_order
from .store import CheckpointStore

PINS, RETIRED = "pins", "retired"
GRACE_SECONDS = 3600.0  # default: how long a retired checkpoint stays loadable by key
DELETE_BATCH = 1000  # objects per delete request (S3's limit)


def marker_ids(store: CheckpointStore, loc: TaskLocation, kind: str) -> set[str]:
    """Ids of a task's checkpoints that carry a marker of this kind (one listing)."""
    return set(store.names_in(posixpath.join(store.task_path(loc), kind)))


def retired_longer_than(store: CheckpointStore, loc: TaskLocation, grace: float) -> list[str]:
    """Ids of a task's checkpoints whose tombstone is older than ``grace`` seconds by the
    storage's clock (one listing with times; the host's clock plays no part)."""
    ages = store.ages_in(loc.flow, posixpath.join(store.task_path(loc), RETIRED))
    return sorted((i for i, age in ages.items() if age >= grace), key=task_order)


def is_marked(store: CheckpointStore, loc: TaskLocation, kind: str, checkpoint_id: str) -> bool:
    return store.exists(_marker_path(store, loc, kind, checkpoint_id))


def live_ids(store: CheckpointStore, loc: TaskLocation) -> list[str]:
    """A task's checkpoint ids, oldest first, without the retired ones."""
    ids = store.list_task(loc)
    retired = marker_ids(store, loc, RETIRED) if ids else set()
    return [i for i in ids if i not in retired]


def put_marker(store: CheckpointStore, loc: TaskLocation, kind: str, checkpoint_id: str) -> None:
    store.touch(_marker_path(store, loc, kind, checkpoint_id))  # empty: only its name and time matter


# ----- what users ask for by key (the client and the CLI) ------------------------------------
def pin(store: CheckpointStore, key: str) -> None:
    """Exempt a checkpoint from retention. Raises if it does not exist or was deleted."""
    loc, checkpoint_id = _existing(store, key)
    if is_marked(store, loc, RETIRED, checkpoint_id):
        raise CheckpointNotFound(f"Checkpoint {key} was deleted; it can no longer be pinned.")
    put_marker(store, loc, PINS, checkpoint_id)


def unpin(store: CheckpointStore, key: str) -> None:
    """Make a checkpoint subject to retention again (no-op if it was not pinned)."""
    loc, checkpoint_id = _existing(store, key)
    remove_paths(store, [_marker_path(store, loc, PINS, checkpoint_id)])


def retire(store: CheckpointStore, key: str) -> bool:
    """Delete a checkpoint (phase one: a tombstone); False if it already was. A pinned
    checkpoint is refused."""
    loc, checkpoint_id = _existing(store, key)
    if is_marked(store, loc, PINS, checkpoint_id):
        raise CheckpointPinned(f"Checkpoint {key} is pinned; unpin it first to delete it.")
    if is_marked(store, loc, RETIRED, checkpoint_id):
        return False
    put_marker(store, loc, RETIRED, checkpoint_id)
    return True


# ----- phase two ------------------------------------------------------------------------------
def purge(store: CheckpointStore, loc: TaskLocation, ids: Iterable[str]) -> list[str]:
    """Remove retired checkpoints' manifests, then their tombstones; return the ids purged.
    Pinned ones are un-retired instead."""
    ids = list(ids)
    pinned = marker_ids(store, loc, PINS) if ids else set()
    gone = [i for i in ids if i not in pinned]
    folder = store.task_path(loc)
    remove_paths(store, [posixpath.join(folder, f"{i}.json") for i in gone])  # manifests first
    remove_paths(store, [_marker_path(store, loc, RETIRED, i) for i in ids])
    return gone


def remove_paths(store: CheckpointStore, paths: list[str], progress=None) -> None:
    """Delete objects in batches (one request per batch on object stores); missing ones are
    fine, since a task's retention and gc may purge the same checkpoint."""
    for start in range(0, len(paths), DELETE_BATCH):
        batch = paths[start:start + DELETE_BATCH]
        store.delete_many(batch)
        if progress is not None:
            progress(start + len(batch), len(paths))


def _marker_path(store: CheckpointStore, loc: TaskLocation, kind: str, checkpoint_id: str) -> str:
    return posixpath.join(store.task_path(loc), kind, checkpoint_id)


def _existing(store: CheckpointStore, key: str) -> tuple[TaskLocation, str]:
    loc, checkpoint_id = parse_key(key)
    store.get_manifest(loc, checkpoint_id)  # raises CheckpointNotFound naming the key
    return loc, checkpoint_id
