"""Lineage is data: each manifest names its parent, and a chain is read by following them."""
from __future__ import annotations

import warnings

from .checkpointer import Checkpointer
from .exceptions import CheckpointError
from .manifest import CheckpointArtifact


def lineage(checkpointer: Checkpointer, key: str) -> list[CheckpointArtifact]:
    """The ancestors of ``key``, oldest first, ending with the checkpoint itself.

    A chain stops early, with a warning, at an ancestor that can no longer be read.
    """
    chain: list[CheckpointArtifact] = []
    seen: set[str] = set()
    while key and key not in seen:
        seen.add(key)
        try:
            artifact = checkpointer.read(key)
        except CheckpointError as exc:
            if not chain:
                raise
            warnings.warn(f"Lineage of {chain[0].key} stops at {key}: {exc}")
            break
        chain.append(artifact)
        key = artifact.parent
    return chain[::-1]
