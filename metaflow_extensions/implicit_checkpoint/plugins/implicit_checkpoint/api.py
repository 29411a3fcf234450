"""``current.checkpoint``: what a decorated step calls."""
from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

from .checkpointer import Checkpointer
from .exceptions import CheckpointFormatError
from .lineage import lineage as follow_lineage
from .manifest import CheckpointArtifact, TaskLocation, parse_key
from .recovery import restore_newest_intact
from .snapshot import select_state
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


@dataclass
class StepContext:
    """What the decorator knows about the running task."""

    flow: Any
    location: TaskLocation
    attempt: int
    load_policy: str
    include: Optional[list]
    exclude: Optional[list]
    reserved: frozenset
    namespace: Optional[str]
    on_first_use: Callable[[], None]
    on_loaded: Callable[[CheckpointArtifact], None]


class CurrentCheckpoint:
    """Checkpoints of the running task: ``save``, ``load``, ``inspect``, ``list``, ``lineage``.

    Available as ``current.checkpoint`` inside a step decorated with ``@checkpoint``.
    """

    def __init__(self, checkpointer: Checkpointer, ctx: StepContext):
        self._checkpointer = checkpointer
        self._ctx = ctx
        self._where = f"step {ctx.location.step!r} ({ctx.location.pathspec}, attempt {ctx.attempt})"
        self._looked_up = False
        self._resumable: Optional[CheckpointArtifact] = None
        self._loaded: Optional[CheckpointArtifact] = None
        self._parent: Optional[str] = None  # last checkpoint loaded or saved in this attempt
        self._used = False

    # ----- what load_policy found ----------------------------------------------------
    @property
    def latest(self) -> Optional[CheckpointArtifact]:
        """The checkpoint ``load()`` restores by default, as ``load_policy`` found it."""
        if not self._looked_up:
            self._looked_up = True
            if self._ctx.load_policy != "none":
                with warnings_to_log():
                    self._resumable = next(self._candidates(), None)
        return self._resumable

    @property
    def is_loaded(self) -> bool:
        """True when there is a checkpoint this task can resume from."""
        return self.latest is not None

    @property
    def loaded(self) -> Optional[CheckpointArtifact]:
        """The checkpoint ``load()`` restored in this attempt, if any."""
        return self._loaded

    # ----- the calls -----------------------------------------------------------------
    def save(self, name: str = "mfchckpt", metadata: Optional[dict] = None, latest: bool = True) -> CheckpointArtifact:
        """Snapshot the step's attributes; returns once the checkpoint is durable.

        ``latest=False`` keeps and lists the checkpoint but never picks it for a default
        ``load()``.
        """
        self._first_use()
        state = select_state(
            vars(self._ctx.flow),
            reserved=self._ctx.reserved,
            include=self._ctx.include,
            exclude=self._ctx.exclude,
            where=self._where,
        )
        artifact = self._checkpointer.save(
            self._ctx.location,
            self._ctx.attempt,
            state,
            name=name,
            metadata=metadata,
            latest=latest,
            parent=self._parent,
            namespace=self._ctx.namespace,
            where=self._where,
        )
        self._parent = artifact.key
        return artifact

    def load(self, reference: Optional[Reference] = None) -> Optional[CheckpointArtifact]:
        """Restore a checkpoint's attributes onto ``self`` and return it.

        With no reference, restores what ``load_policy`` found and returns ``None`` when
        there is nothing to load; if that checkpoint's payloads are damaged, warns naming
        them and falls back to the newest intact checkpoint. An explicit reference that does
        not exist or is damaged raises.
        """
        if reference is None and self.latest is None:
            return None
        self._first_use()
        if reference is None:
            # Damaged payloads of the newest candidate: warn and fall back to an older one.
            with warnings_to_log():
                found = restore_newest_intact(self._checkpointer, self._candidates())
            self._resumable = found[0] if found else None
            if found is None:
                return None
            artifact, values = found
        else:
            artifact = self._checkpointer.read(self._own_flow_key(reference))
            values = self._checkpointer.restore(artifact)
        for name, value in values.items():
            setattr(self._ctx.flow, name, value)
        self._loaded = artifact
        self._parent = artifact.key
        self._ctx.on_loaded(artifact)
        return artifact

    def inspect(self, reference: Optional[Reference] = None) -> Optional[dict]:
        """What a checkpoint holds, from its manifest alone: ``{"version", "fields"}``.

        With no reference: the checkpoint last saved or loaded in this attempt, else the one
        ``load()`` would restore; ``None`` when there is none.
        """
        if reference is not None:
            return self._checkpointer.read(self._key(reference)).implicit_manifest
        key = self._parent or (self.latest.key if self.latest else None)
        return self._checkpointer.read(key).implicit_manifest if key else None

    def list(self, name: Optional[str] = None, attempt: Optional[int] = None, task: Any = None) -> list[CheckpointArtifact]:
        """This task's checkpoints over all its attempts, newest first by creation time.

        ``task=`` (a ``Task`` or pathspec) lists another task's instead.
        """
        if task is not None:
            from .client import Checkpoint

            return Checkpoint().list(task=task, name=name, attempt=attempt)
        with warnings_to_log():
            return self._checkpointer.list(self._ctx.location, name=name, attempt=attempt)

    def lineage(self, reference: Optional[Reference] = None) -> list[CheckpointArtifact]:
        """Ancestors of a checkpoint (default: the one loaded in this attempt), oldest first,
        the checkpoint itself last; ``[]`` when nothing was loaded."""
        if reference is None and self._loaded is None:
            return []
        key = self._loaded.key if reference is None else self._key(reference)
        with warnings_to_log():
            return follow_lineage(self._checkpointer, key)

    def _candidates(self):
        return self._checkpointer.resumable(
            self._ctx.location,
            self._ctx.attempt,
            other_runs=self._ctx.load_policy == "eager",
            namespace=self._ctx.namespace,
        )

    def _key(self, reference: Reference) -> str:
        return key_in_store(reference, self._checkpointer.store)

    def _own_flow_key(self, reference: Reference) -> str:
        key = self._key(reference)
        if parse_key(key)[0].flow != self._ctx.location.flow:
            raise CheckpointFormatError(
                f"Checkpoint {key} belongs to another flow; {self._where} can only load "
                f"checkpoints of {self._ctx.location.flow}. Use Checkpoint().load(...) to "
                "read it as a dict."
            )
        return key

    def _first_use(self) -> None:
        if not self._used:
            self._used = True
            self._ctx.on_first_use()

    def __repr__(self) -> str:
        return f"<current.checkpoint of {self._ctx.location.pathspec} attempt {self._ctx.attempt}>"
