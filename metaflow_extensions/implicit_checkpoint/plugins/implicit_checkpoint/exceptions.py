"""One exception family for everything that can go wrong with a checkpoint.

Messages name the step, the checkpoint and the attribute involved, and say what to do.
"Nothing to load" is not an error (``load()`` returns ``None``); an explicitly requested
checkpoint that does not exist is.
"""
from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error raised by metaflow-implicit-checkpoint."""

    headline = "Checkpoint error"


class CheckpointConfigError(CheckpointError):
    """The decorator or the storage root is misconfigured."""

    headline = "Invalid @checkpoint configuration"


class CheckpointSaveError(CheckpointError):
    """A save could not snapshot the state; earlier checkpoints are untouched."""

    headline = "Checkpoint save failed"


class CheckpointNotFound(CheckpointError):
    """An explicitly requested checkpoint does not exist."""

    headline = "Checkpoint not found"


class CheckpointCorrupt(CheckpointError):
    """A stored payload or manifest is damaged or missing: it does not match its hash or seal."""

    headline = "Checkpoint is corrupt"


class CheckpointRestoreError(CheckpointError):
    """A checkpoint is intact but cannot be rebuilt here (e.g. a class it needs is gone)."""

    headline = "Checkpoint could not be restored"


class CheckpointFormatError(CheckpointError):
    """A manifest or reference is malformed, or written by a newer version of this package."""

    headline = "Unreadable checkpoint"


class CheckpointPinned(CheckpointError):
    """A pinned checkpoint was asked to be deleted."""

    headline = "Checkpoint is pinned"


class CheckpointUntrusted(CheckpointError):
    """With a secret configured, a manifest is unsigned or signed with another secret."""

    headline = "Untrusted checkpoint"


class CheckpointStorageError(CheckpointError):
    """The storage could not be reached or written, even after retrying transient faults."""

    headline = "Checkpoint storage failed"
