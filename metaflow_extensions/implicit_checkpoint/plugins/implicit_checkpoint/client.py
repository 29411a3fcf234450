"""``Checkpoint``: read checkpoints outside a task (a notebook, a script).

The storage root of a task is not guessed: the decorator records it as task metadata
(``implicit-checkpoint-root``) when the task first saves or loads, and this client reads it
back through Metaflow's client, in any namespace.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

from .api import Reference, key_in_store, key_of
from .checkpointer import Checkpointer
from .exceptions import CheckpointNotFound
from .lineage import lineage as follow_lineage
from .manifest import CheckpointArtifact, TaskLocation, parse_key
from .store import open_store

ROOT_FIELD = "implicit-checkpoint-root"
POSITION_FIELD = "implicit-checkpoint-position"
LOADED_FIELD = "implicit-checkpoint-loaded"


def _task(task: Any):
    from metaflow import Task
    from metaflow.exception import MetaflowNotFound

    if not isinstance(task, str):
        return task
    try:
        return Task(task, _namespace_check=False)
    except MetaflowNotFound:
        raise CheckpointNotFound(
            f"No task {task!r}: pass a Task or its pathspec 'Flow/run/step/task'."
        ) from None


class Checkpoint:
    """Checkpoints of any task, from outside it.

    >>> from metaflow import Checkpoint
    >>> cps = Checkpoint().list(task="TrainFlow/1732/train/4")
    >>> state = Checkpoint().load(cps[0])            # {"epoch": 7, "model": ...}

    ``root=`` overrides the storage root recorded by the task.
    """

    def __init__(self, root: Optional[str] = None):
        self._root = root

    def list(self, task: Any, name: Optional[str] = None, attempt: Optional[int] = None) -> list[CheckpointArtifact]:
        """All checkpoints of ``task`` (a ``Task`` or pathspec) over all its attempts,
        newest first; ``name=`` and ``attempt=`` filter."""
        found = self._locate(task)
        if found is None:
            return []
        checkpointer, loc = found
        return checkpointer.list(loc, name=name, attempt=attempt)

    def load(self, reference: Reference, into: Any = None, fields: Optional[Iterable[str]] = None) -> dict[str, Any]:
        """The fields of a checkpoint as a dict; with ``into=``, also set them on that object."""
        checkpointer = self._checkpointer_for(reference)
        values = checkpointer.restore(checkpointer.read(key_in_store(reference, checkpointer.store)), fields)
        if into is not None:
            for name, value in values.items():
                setattr(into, name, value)
        return values

    def inspect(self, reference: Reference) -> dict:
        """What a checkpoint holds, from its manifest alone."""
        checkpointer = self._checkpointer_for(reference)
        return checkpointer.read(key_in_store(reference, checkpointer.store)).implicit_manifest

    def lineage(self, reference: Reference) -> list[CheckpointArtifact]:
        """Ancestors of a checkpoint, oldest first, the checkpoint itself last."""
        checkpointer = self._checkpointer_for(reference)
        return follow_lineage(checkpointer, key_in_store(reference, checkpointer.store))

    # ----- finding a task's storage ---------------------------------------------------
    def _checkpointer_for(self, reference: Reference) -> Checkpointer:
        loc = parse_key(key_of(reference))[0]
        found = self._locate(loc.pathspec)
        if found is None:
            raise CheckpointNotFound(
                f"Task {loc.pathspec} recorded no checkpoint storage: it never saved a "
                "checkpoint. Pass Checkpoint(root=...) if its checkpoints live elsewhere."
            )
        return found[0]

    def _locate(self, task: Any) -> Optional[tuple[Checkpointer, TaskLocation]]:
        task = _task(task)
        meta = task.metadata_dict
        root = self._root or meta.get(ROOT_FIELD)
        if root is None:
            return None
        flow, run, step, task_id = task.pathspec.split("/")
        loc = TaskLocation(flow, run, step, task_id, meta.get(POSITION_FIELD) or "root")
        return Checkpointer(open_store(root)), loc
