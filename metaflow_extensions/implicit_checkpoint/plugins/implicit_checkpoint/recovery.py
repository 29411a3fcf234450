"""Resuming from the newest intact checkpoint when newer ones are damaged.

A checkpoint whose manifest is damaged is never offered: ``list()`` and the resume lookup skip it
with a warning. Damaged or missing payloads show only when they are read, so resuming restores the
best candidate and, if a payload fails its hash or is gone, warns naming the checkpoint and the
field, then tries the next best; so does a checkpoint of an older format that this version
cannot load. A task thus resumes from the newest intact checkpoint instead of
failing the same way on every retry. An explicitly requested checkpoint never falls back.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional

from .checkpointer import Checkpointer
from .exceptions import CheckpointCorrupt, CheckpointFormatError
from .manifest import CheckpointArtifact


def restore_newest_intact(
    checkpointer: Checkpointer, candidates: Iterable[CheckpointArtifact]
) -> Optional[tuple[CheckpointArtifact, dict[str, Any]]]:
    """The first candidate whose payloads all verify, with its values; ``None`` if none does."""
    damaged = 0
    for artifact in candidates:
        try:
            return artifact, checkpointer.restore(artifact)
        except (CheckpointCorrupt, CheckpointFormatError) as exc:  # damaged, or an older format
            damaged += 1
            what = "damaged checkpoint" if isinstance(exc, CheckpointCorrupt) else "checkpoint"
            warnings.warn(f"Not resuming from {what} {artifact.key}: {exc} Trying an older one.")
    if damaged:
        warnings.warn(f"All {damaged} checkpoint(s) to resume from are damaged; nothing was loaded.")
    return None
