"""``current.checkpoint``: what a decorated step calls."""
from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional

from . import retention
from .background import raise_failures
from .checkpointer import Checkpointer
from .exceptions import CheckpointError, CheckpointFormatError, CheckpointNotFound
from .files import restore_all
from .lineage import lineage as follow_lineage
from .manifest import CheckpointArtifact, TaskLocation, parse_key
from .recovery import restore_newest_intact
from .references import Reference, key_in_store, warnings_to_log
from .saving import Saver
from .snapshot import select_state
from .steps import find_step
from .store import open_store
from .writer import Capture, capture


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
    on_saved: Callable[[CheckpointArtifact], None] = lambda artifact: None  # after each durable save; cheap, thread-safe
    async_saves: bool = True
    keep: Optional[retention.KeepPolicy] = None
    preempted: Callable[[], bool] = lambda: False  # SIGTERM or a spot notice (preemption.py)


class CurrentCheckpoint:
    """Checkpoints of the running task: ``save``, ``load``, ``inspect``, ``list``, ``lineage``.

    Available as ``current.checkpoint`` inside a step decorated with ``@checkpoint``.
    """

    def __init__(self, checkpointer: Checkpointer, ctx: StepContext):
        self._checkpointer = checkpointer
        self._ctx = ctx
        self._saver = Saver(checkpointer, ctx.async_saves, on_commit=ctx.on_saved)
        self._where = ctx.location.where(ctx.attempt)
        self._looked_up = False
        self._resumable: Optional[CheckpointArtifact] = None
        self._fallbacks: Optional[Iterator[CheckpointArtifact]] = None  # the lookup's other candidates
        self._loaded: Optional[CheckpointArtifact] = None
        self._parent: Optional[str] = None  # last checkpoint loaded or saved in this attempt
        self._used = False
        self._seen_earlier = False
        self._retainer = retention.Retainer(checkpointer, ctx.location, ctx.keep) if ctx.keep else None

    # ----- what load_policy found ----------------------------------------------------
    @property
    def latest(self) -> Optional[CheckpointArtifact]:
        """The checkpoint ``load()`` restores by default, as ``load_policy`` found it."""
        if not self._looked_up:
            self._looked_up = True
            if self._ctx.load_policy != "none":
                with warnings_to_log():
                    self._fallbacks = self._candidates()
                    self._resumable = next(self._fallbacks, None)
        return self._resumable

    @property
    def is_loaded(self) -> bool:
        """True when there is a checkpoint this task can resume from."""
        return self.latest is not None

    @property
    def preempted(self) -> bool:
        """True once the task got SIGTERM or a spot-termination notice: save and return now.
        The task then ends as SIGTERM would, once pending saves are flushed (within
        ``METAFLOW_IMPLICIT_CHECKPOINT_PREEMPT_SECONDS`` of the signal), so ``@retry`` resumes."""
        return self._ctx.preempted()

    @property
    def loaded(self) -> Optional[CheckpointArtifact]:
        """The checkpoint ``load()`` restored in this attempt, if any."""
        return self._loaded

    # ----- the calls -----------------------------------------------------------------
    def save(
        self, name: str = "mfchckpt", metadata: Optional[dict] = None, latest: bool = True,
        wait: bool = False, pin: bool = False, step: Optional[int] = None,
    ) -> CheckpointArtifact:
        """Snapshot the step's attributes and return the checkpoint.

        Returns once the state is captured, without waiting on storage: small states are
        written by a background thread (batched: of saves arriving while it writes, the newest
        of each name is written next), large ones by a forked writer. The returned
        artifact then lacks payload hashes and ``written``; ``wait()`` returns the stored ones.
        ``wait=True`` is a critical save: it returns only when this and every earlier save is
        durable.
        ``latest=False`` keeps and lists the checkpoint but never picks it for a default
        ``load()``. ``pin=True`` exempts it from ``@checkpoint(keep=...)`` retention.
        ``step=N`` records the training step (a whole number >= 0) for ``load(step=N)``.
        """
        self._first_use()
        self._ready_to_save()  # here, not in a child
        self._settle(self._saver.poll())
        cap = capture(
            self._ctx.location,
            self._ctx.attempt,
            select_state(
                vars(self._ctx.flow),
                reserved=self._ctx.reserved,
                include=self._ctx.include,
                exclude=self._ctx.exclude,
                where=self._where,
            ),
            name=name,
            metadata=metadata,
            latest=latest,
            parent=self._parent,
            namespace=self._ctx.namespace,
            where=self._where,
            resumed_from=self._loaded.key if self._loaded else None,
            runs=self._checkpointer.segments,
            step=step,
        )
        return self._dispatch(cap, wait, pin)

    def _dispatch(self, cap: Capture, wait: bool, pin: bool) -> CheckpointArtifact:
        """Commit ``cap`` now (critical), or hand it to a writer (``saving.py``)."""
        route = self._saver.route(cap, wait, pin)
        if route is None:
            self._settle(self._saver.flush())  # everything before it first
            artifact = self._saver.commit(cap, pin)
            self._parent = artifact.key
            self._ctx.on_saved(artifact)
            self._retain([artifact])
            return artifact
        done = self._saver.submit(cap, pin, route)
        self._parent = cap.key
        self._settle(done)
        pending = cap.artifact(url=self._checkpointer.store.manifest_url(cap.loc, cap.checkpoint_id))
        return replace(pending, pinned=pin)

    def wait(self) -> list[CheckpointArtifact]:
        """Block until every pending save is durable; return them as stored, oldest first.
        Raises if any of them failed."""
        return self._settle(self._saver.flush())

    def _settle(self, results: list[dict]) -> list[CheckpointArtifact]:
        """Apply retention after saves the writers committed (each already announced by
        ``on_saved``: saving.py); raise the failures, naming the checkpoints."""
        done = [result["artifact"] for result in results if result.get("ok")]
        if done:
            self._retain(done)
        raise_failures(results, self._where)
        return done

    def load(self, reference: Optional[Reference] = None, step: Optional[int] = None) -> Optional[CheckpointArtifact]:
        """Restore a checkpoint's attributes onto ``self`` and return it.

        With no reference, restores what ``load_policy`` found and returns ``None`` when
        there is nothing to load; if that checkpoint's payloads are damaged, warns naming
        them and falls back to the newest intact checkpoint. An explicit reference that does
        not exist or is damaged raises. ``step=N``: the newest checkpoint saved with
        ``save(step=N)`` by this task (then, with ``load_policy="eager"``, by other runs at its
        position); none raises ``CheckpointNotFound`` naming the steps that exist.
        """
        if step is not None:
            reference = self._by_step(reference, step)
        if reference is None and self.latest is None:
            return None
        self._first_use()
        if reference is None:
            # Damaged payloads of the newest candidate: warn and fall back to an older one.
            with warnings_to_log():
                # One lookup: what `latest` found first, then the rest of the same listing.
                candidates = itertools.chain([self.latest], self._fallbacks) if self._fallbacks else self._candidates()
                self._fallbacks = None
                found = restore_newest_intact(self._checkpointer, candidates)
            self._resumable = found[0] if found else None
            if found is None:
                return None
            artifact, values = found
        else:
            key = self._own_flow_key(reference)
            artifact, values = self._committed(lambda: self._checkpointer.load(key))
        for name, value in restore_all(values).items():  # folders written back to their paths
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
        key = self._key(reference) if reference is not None else self._parent or (self.latest.key if self.latest else None)
        return self._committed(lambda: self._checkpointer.read(key)).implicit_manifest if key else None

    def list(self, name: Optional[str] = None, attempt: Optional[int] = None, task: Any = None,
             step: Optional[int] = None) -> list[CheckpointArtifact]:
        """This task's committed checkpoints over all its attempts, newest first (a save still
        being written appears once it is: ``wait()`` writes them all).

        ``name``, ``attempt`` and ``step`` filter; ``task=`` (a ``Task`` or pathspec) lists
        another task's instead.
        """
        if task is not None:
            from .client import Checkpoint

            return Checkpoint().list(task=task, name=name, attempt=attempt, step=step)
        self._settle(self._saver.poll())
        with warnings_to_log():
            return self._checkpointer.list(self._ctx.location, name=name, attempt=attempt, step=step)

    def lineage(self, reference: Optional[Reference] = None) -> list[CheckpointArtifact]:
        """Ancestors of a checkpoint (default: the one loaded in this attempt), oldest first,
        the checkpoint itself last; ``[]`` when nothing was loaded."""
        if reference is None and self._loaded is None:
            return []
        key = self._loaded.key if reference is None else self._key(reference)
        with warnings_to_log():
            return self._committed(lambda: follow_lineage(self._checkpointer, key))

    def _committed(self, read: Callable[[], Any]) -> Any:
        """``read()``; if what it reads is not stored yet while saves are pending (a save of this
        attempt, still queued), once more after writing them."""
        try:
            return read()
        except CheckpointNotFound:
            if not self.pending:
                raise
        self._settle(self._saver.flush())
        return read()

    def _by_step(self, reference: Optional[Reference], step: int) -> CheckpointArtifact:
        if reference is not None:
            raise CheckpointFormatError(f"load() in {self._where} takes a reference or step=, not both.")
        self.wait()  # a save of that step may still be written in the background
        with warnings_to_log():
            return find_step(self._checkpointer, self._ctx.location, step, where=self._where,
                             other_runs=self._ctx.load_policy == "eager", namespace=self._ctx.namespace)

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

    def _ready_to_save(self) -> None:
        """Before this attempt's first save: check that the root can be written (naming it if
        not), then move the logical clock (ids.py) past every checkpoint this attempt could
        resume from (listing them does it), so what it saves is newer whatever the clocks say."""
        store, loc = self._checkpointer.store, self._ctx.location
        store.check_writable(loc.flow)
        if not self._seen_earlier:
            store.list_task(loc)
            if self._ctx.load_policy == "eager":
                store.list_position(loc.flow, loc.step, loc.position)
            self._seen_earlier = True

    @property
    def pending(self) -> int:
        """How many saves are still to be written in the background."""
        return self._saver.pending

    def __repr__(self) -> str:
        return f"<current.checkpoint of {self._ctx.location.pathspec} attempt {self._ctx.attempt}>"

    def _retain(self, saved: list[CheckpointArtifact]) -> None:
        """Apply ``@checkpoint(keep=...)`` now that saves are committed (retention.py)."""
        if self._retainer is None:
            return
        try:
            self._retainer.after_saves(saved, self._loaded.key if self._loaded else None)
        except (OSError, CheckpointError) as exc:  # the save is durable; retried next save
            # stderr, not warnings: Metaflow silences warnings in task processes
            print(f"Retention in {self._where} could not delete old checkpoints ({exc}); "
                  "they are kept, and retried at the next save.", file=sys.stderr)


def standalone(
    obj: Any, root: str, location: TaskLocation, attempt: int = 0, async_saves: bool = True,
    keep: Optional[dict] = None,
) -> CurrentCheckpoint:
    """``current.checkpoint`` for a plain object outside Metaflow (scripts, tests, benchmarks):
    its public attributes are the state, stored under ``root`` as if by task ``location``."""
    ctx = StepContext(
        flow=obj, location=location, attempt=attempt, load_policy="fresh", include=None,
        exclude=None, reserved=frozenset(), namespace=None, on_first_use=lambda: None,
        on_loaded=lambda artifact: None, async_saves=async_saves, keep=retention.parse_keep(keep),
    )
    return CurrentCheckpoint(Checkpointer(open_store(root)), ctx)
