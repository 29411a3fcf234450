"""How a checkpoint is referred to (an artifact, its ``to_dict()``, or its key), and how the
warnings of reading many checkpoints reach a task's log."""
from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Iterator, Union

from .exceptions import CheckpointFormatError
from .manifest import CheckpointArtifact, parse_key
from .store import CheckpointStore

Reference = Union[CheckpointArtifact, dict, str]


def key_of(reference: Reference) -> str:
    """The key of a reference given as an artifact, its ``to_dict()`` or its key."""
    if isinstance(reference, CheckpointArtifact):
        return reference.key
    if isinstance(reference, dict):
        return CheckpointArtifact.from_dict(reference).key
    if isinstance(reference, str):
        parse_key(reference)
        return reference
    raise CheckpointFormatError(
        f"A checkpoint reference is a CheckpointArtifact, its to_dict() or its key, "
        f"not {type(reference).__name__}."
    )


def key_in_store(reference: Reference, store: CheckpointStore) -> str:
    """The key of a reference that belongs to ``store``.

    A key is always read inside the store (its parts cannot climb out of the root). An artifact
    or dict also says where it was saved (``url``): one saved under another root is refused
    rather than silently read from this one.
    """
    key = key_of(reference)
    url = reference.url if isinstance(reference, CheckpointArtifact) else None
    if isinstance(reference, dict):
        url = reference.get("url")
    here = store.manifest_url(*parse_key(key))
    if url is not None and url != here:
        raise CheckpointFormatError(
            f"Checkpoint {key} was saved at {url}, outside this storage ({store.url}). Open "
            "that storage with Checkpoint(root=...), or pass the key alone to read the checkpoint "
            "with that key from this one."
        )
    return key


@contextlib.contextmanager
def warnings_to_log() -> Iterator[None]:
    """Print warnings (a damaged checkpoint skipped) to stderr, the task's log: Metaflow's CLI
    ignores all Python warnings, and these must be seen."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        print(f"@checkpoint warning: {warning.message}", file=sys.stderr)
