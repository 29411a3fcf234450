"""Lineage is data: each manifest names its parent, and a chain is read by following them.

Retention deletes intermediate saves, so a parent may be gone. Every manifest also records
``resumed_from``, the checkpoint its attempt loaded; retention keeps those. When a parent is
gone (retired or purged), the chain continues from the ``resumed_from`` of the oldest
checkpoint found so far: the saves in between are skipped, the history across attempts and
runs is not.
"""
from __future__ import annotations

import warnings
from typing import Optional

from .checkpointer import Checkpointer
from .exceptions import CheckpointError
from .manifest import CheckpointArtifact, parse_key
from .marks import RETIRED, marker_ids


def lineage(checkpointer: Checkpointer, key: str, limit: Optional[int] = None) -> list[CheckpointArtifact]:
    """The ancestors of ``key``, oldest first, ending with the checkpoint itself; with
    ``limit``, only that many of the nearest (a task's chain can be 10,000 saves long).

    Deleted ancestors are skipped (see the module docstring). A chain stops early, with a
    warning, when the checkpoint an attempt resumed from can no longer be read.
    """
    chain = [checkpointer.read(key)]
    seen = {key}
    retired: dict[str, set[str]] = {}  # task folder -> retired ids, listed once per task
    next_key, jumped = chain[0].parent, False
    while next_key and next_key not in seen and (limit is None or len(chain) < limit):
        seen.add(next_key)
        artifact = _read_live(checkpointer, next_key, retired)
        if artifact is not None:
            chain.append(artifact)
            next_key, jumped = artifact.parent, False
            continue
        resumed_from = chain[-1].resumed_from
        if jumped or resumed_from is None or resumed_from == next_key:
            if resumed_from is not None:
                warnings.warn(f"Lineage of {key} stops at {next_key}: it was deleted or cannot be read.")
            break
        next_key, jumped = resumed_from, True  # skip the deleted saves of that attempt
    return chain[::-1]


def _read_live(checkpointer: Checkpointer, key: str, retired: dict[str, set[str]]) -> Optional[CheckpointArtifact]:
    """The checkpoint, or None if it was deleted (retired or purged) or cannot be read."""
    loc, checkpoint_id = parse_key(key)
    folder = checkpointer.store.task_path(loc)
    if folder not in retired:
        retired[folder] = marker_ids(checkpointer.store, loc, RETIRED)
    if checkpoint_id in retired[folder]:
        return None
    try:
        return checkpointer.known(key) or checkpointer.read(key)
    except CheckpointError:
        return None
