"""``Checkpoint``: read and manage checkpoints outside a task (a notebook, a script, the CLI).

The storage root of a task is not guessed: the decorator records it as task metadata
(``implicit-checkpoint-root``) when the task first saves or loads, and this client reads it
back through Metaflow's client, in any namespace.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

from . import marks
from .references import Reference, key_in_store, key_of
from .checkpointer import Checkpointer
from .display import CheckpointList
from .exceptions import CheckpointFormatError, CheckpointNotFound
from .lineage import lineage as follow_lineage
from .manifest import CheckpointArtifact, TaskLocation, parse_key
from .steps import find_step
from .store import open_store

ROOT_FIELD = "implicit-checkpoint-root"
POSITION_FIELD = "implicit-checkpoint-position"
LOADED_FIELD = "implicit-checkpoint-loaded"


@contextmanager
def any_namespace() -> Iterator[None]:
    """Metaflow's client across all namespaces, and the caller's namespace back afterwards.

    A pathspec names one task in any namespace; reading it needs no user name. Metaflow's
    client resolves its default namespace, the user's (``$USERNAME``), the first time it is
    asked, even for objects read with the check off; without a user name that raises
    ``MetaflowUnknownUser``. So the client's namespace is set aside, not resolved.
    """
    from metaflow.client import core

    saved = core.current_namespace  # False: the default, not resolved yet
    core.current_namespace = None
    try:
        yield
    finally:
        core.current_namespace = saved


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

    ``root=`` overrides the storage root recorded by the task (and then a checkpoint key is
    found without asking Metaflow's metadata).
    """

    def __init__(self, root: Optional[str] = None):
        self._root = root

    def list(self, task: Any, name: Optional[str] = None, attempt: Optional[int] = None,
             step: Optional[int] = None) -> CheckpointList:
        """All checkpoints of ``task`` (a ``Task`` or pathspec) over all its attempts,
        newest first; ``name=``, ``attempt=`` and ``step=`` filter. Deleted ones are not listed.
        The list shows itself as a table (HTML in Jupyter)."""
        found = self._locate(task)
        if found is None:
            return CheckpointList()
        checkpointer, loc = found
        return CheckpointList(checkpointer.list(loc, name=name, attempt=attempt, step=step))

    def load(self, reference: Optional[Reference] = None, into: Any = None, fields: Optional[Iterable[str]] = None,
             *, task: Any = None, step: Optional[int] = None) -> dict[str, Any]:
        """The fields of a checkpoint as a dict; with ``into=``, also set them on that object.
        ``fields=["model"]`` fetches only the named fields' payloads. Instead of a reference,
        ``task=..., step=N`` loads the newest checkpoint that task saved with ``save(step=N)``
        (none raises ``CheckpointNotFound`` naming the steps it has)."""
        if step is not None or task is not None:
            reference = self._by_step(reference, task, step)
        checkpointer = self.checkpointer_for(reference)
        values = checkpointer.load(key_in_store(reference, checkpointer.store), fields)[1]
        if into is not None:
            for name, value in values.items():
                setattr(into, name, value)
        return values

    def inspect(self, reference: Reference) -> dict:
        """What a checkpoint holds, from its manifest alone."""
        checkpointer = self.checkpointer_for(reference)
        return checkpointer.read(key_in_store(reference, checkpointer.store)).implicit_manifest

    def lineage(self, reference: Reference) -> CheckpointList:
        """Ancestors of a checkpoint, oldest first, the checkpoint itself last. Deleted saves
        are skipped; the chain goes on through the checkpoints each attempt resumed from."""
        checkpointer = self.checkpointer_for(reference)
        return CheckpointList(follow_lineage(checkpointer, key_in_store(reference, checkpointer.store)))

    def pin(self, reference: Reference) -> None:
        """Exempt a checkpoint from retention (``@checkpoint(keep=...)``) and deletion."""
        store = self.checkpointer_for(reference).store
        marks.pin(store, key_in_store(reference, store))

    def unpin(self, reference: Reference) -> None:
        """Make a pinned checkpoint subject to retention again."""
        store = self.checkpointer_for(reference).store
        marks.unpin(store, key_in_store(reference, store))

    def delete(self, reference: Reference) -> bool:
        """Delete a checkpoint: it disappears from ``list()`` at once and is purged by ``gc``
        once the grace period has passed. False if it was already deleted; a pinned one raises
        ``CheckpointPinned``."""
        store = self.checkpointer_for(reference).store
        return marks.retire(store, key_in_store(reference, store))

    def delete_run(self, run: Any) -> "RunDeletion":
        """Delete every checkpoint of a run (a ``Run`` or pathspec ``Flow/run``), except pinned
        ones, which are reported."""
        from metaflow import Run

        deleted, pinned = [], []
        with any_namespace():
            run = Run(run, _namespace_check=False) if isinstance(run, str) else run
            tasks = [task for step in run for task in step]
        for task in tasks:
            found = self._locate(task)
            if found is None:
                continue
            checkpointer, loc = found
            for artifact in checkpointer.list(loc):
                if artifact.pinned:
                    pinned.append(artifact.key)
                elif marks.retire(checkpointer.store, artifact.key):
                    deleted.append(artifact.key)
        return RunDeletion(run.pathspec, deleted, pinned)

    def _by_step(self, reference: Optional[Reference], task: Any, step: Optional[int]) -> CheckpointArtifact:
        if reference is not None or task is None or step is None:
            raise CheckpointFormatError("Checkpoint().load() takes a reference, or task= and step= together.")
        found = self._locate(task)
        pathspec = task if isinstance(task, str) else task.pathspec
        if found is None:
            raise CheckpointNotFound(f"Task {pathspec} recorded no checkpoint storage: it never saved a checkpoint.")
        return find_step(found[0], found[1], step, other_runs=False, namespace=None, where=f"task {pathspec}")

    # ----- finding a task's storage ---------------------------------------------------
    def checkpointer_for(self, reference: Reference) -> Checkpointer:
        """The engine over the storage this checkpoint lives in (what the CLI builds on)."""
        key = key_of(reference)
        loc = parse_key(key)[0]
        if self._root is not None:
            return Checkpointer(open_store(self._root))
        try:
            found = self._locate(loc.pathspec)
        except CheckpointNotFound:
            raise CheckpointNotFound(f"No checkpoint {key}: its task {loc.pathspec} does not exist.") from None
        if found is None:
            raise CheckpointNotFound(
                f"Task {loc.pathspec} recorded no checkpoint storage: it never saved a "
                "checkpoint. Pass Checkpoint(root=...) if its checkpoints live elsewhere."
            )
        return found[0]

    def _locate(self, task: Any) -> Optional[tuple[Checkpointer, TaskLocation]]:
        with any_namespace():
            task = _task(task)
            meta = task.metadata_dict
        root = self._root or meta.get(ROOT_FIELD)
        if root is None:
            return None
        flow, run, step, task_id = task.pathspec.split("/")
        loc = TaskLocation(flow, run, step, task_id, meta.get(POSITION_FIELD) or "root")
        return Checkpointer(open_store(root)), loc


@dataclass(frozen=True)
class RunDeletion:
    """What ``delete_run`` did: the keys it deleted and the pinned keys it kept."""

    run: str
    deleted: list
    pinned: list
