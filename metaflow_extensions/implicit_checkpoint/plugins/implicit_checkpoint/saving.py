"""Where a captured save goes: committed in the step, by the writer thread, or by a forked writer.

- **Now, in the step**: critical saves (``save(wait=True)``; ``pin=True`` for a small state),
  every save with ``async_saves=False``, and large saves where nothing can fork (not Linux, or
  storage only this process sees). Every pending save is written first (the caller flushes).
- **The writer thread** (``batching.py``): small saves, their mutable buffers copied. Batched:
  a newer save of the same name and step supersedes a waiting one.
- **A forked writer** (``background.py``): saves whose mutable part is ``ASYNC_MIN_BYTES`` or
  more; copying them would cost what writing them does, so the child sees them copy-on-write.

A save's mutable part is its pickle stream and the buffers the step may still change; buffers
that are ``bytes`` (the runs of long lists, big strings: ``segments.py``) cannot change.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

from .background import BackgroundSaves
from .batching import BatchedSaves
from .checkpointer import Checkpointer
from .manifest import CheckpointArtifact
from .store import CheckpointStore
from .writer import Capture

ASYNC_MIN_BYTES = 8 << 20


class Saver:
    """The writers of one task's saves."""

    def __init__(self, checkpointer: Checkpointer, async_saves: bool,
                 on_commit: Callable[[CheckpointArtifact], None] = lambda artifact: None):
        self.checkpointer = checkpointer
        self._on_commit = on_commit
        usable = async_saves and checkpointer.store.shared_across_processes
        self._forked = BackgroundSaves() if usable and BackgroundSaves.available() else None
        self._batched = BatchedSaves(checkpointer.commit, on_commit) if async_saves else None

    def route(self, cap: Capture, wait: bool, pin: bool) -> Optional[str]:
        """``None``: commit ``cap`` now (``flush()`` then ``commit()``); else the writer
        ``submit()`` hands it to: ``"thread"`` or ``"fork"``."""
        big = _copied_bytes(cap) >= ASYNC_MIN_BYTES
        if self._batched is None or wait or (pin and not big) or (big and self._forked is None):
            return None
        return "fork" if big else "thread"

    def commit(self, cap: Capture, pin: bool) -> CheckpointArtifact:
        """Write ``cap`` in the step (after ``flush()``)."""
        return self.checkpointer.commit(self._with_written_parent(cap), pin)

    def submit(self, cap: Capture, pin: bool, route: str) -> list[dict]:
        """Hand ``cap`` to the writer ``route`` names; the results of saves that finished meanwhile."""
        if route == "thread":
            return self._batched.submit(_with_own_buffers(cap))
        self._batched.supersede(cap)  # this newer save goes to a forked writer
        cap, store = self._with_written_parent(cap), self.checkpointer.store
        with self._batched.quiet():  # the child inherits no lock the writer thread holds
            return self._settled(self._forked.submit(cap.key, lambda: _commit_in_child(store, cap, pin)))

    def poll(self) -> list[dict]:
        """Results of the saves written since the last call, without waiting."""
        return [*(self._batched.poll() if self._batched else []), *self._settled(self._forked.poll() if self._forked else [])]

    def flush(self) -> list[dict]:
        """Write every pending save now; their results."""
        return [*(self._batched.wait() if self._batched else []), *self._settled(self._forked.wait() if self._forked else [])]

    def _settled(self, results: list[dict]) -> list[dict]:
        """Results of forked writers in the shape of the writer thread's: the stored checkpoint
        (remembered, with the payloads the child learnt of), announced by ``on_commit``."""
        for result in results:
            if result.get("ok"):
                result["artifact"] = CheckpointArtifact.from_dict(result["artifact"])
                self.checkpointer.remember(result["artifact"])
                self.checkpointer.store.remember(result.get("known", {}))
                self._on_commit(result["artifact"])
        return results

    @property
    def pending(self) -> int:
        return (self._batched.pending if self._batched else 0) + (self._forked.pending if self._forked else 0)

    @property
    def forked_children(self) -> list:
        return self._forked._children if self._forked else []

    def _with_written_parent(self, cap: Capture) -> Capture:
        """``cap`` with the nearest ancestor that was written (a superseded save never is)."""
        return replace(cap, parent=self._batched.parent_of(cap.parent)) if self._batched else cap


def _copied_bytes(cap: Capture) -> int:
    """What queuing ``cap`` copies: its stream and the buffers the step may still change."""
    return len(cap.graph.body) + sum(b.nbytes for b in cap.graph.buffers if not isinstance(b.obj, bytes))


def _with_own_buffers(cap: Capture) -> Capture:
    """``cap`` holding copies of the buffers the step may change after ``save()`` returns."""
    own = tuple(b if isinstance(b.obj, bytes) else memoryview(bytes(b)) for b in cap.graph.buffers)
    return replace(cap, graph=replace(cap.graph, buffers=own))


def _commit_in_child(store: CheckpointStore, cap: Capture, pin: bool) -> dict:
    """A forked commit, and what the child learnt of stored payloads (``store.known()``), so
    the step goes on reusing them while they are young enough (store.py)."""
    child = Checkpointer(store.reopened())
    return {"artifact": child.commit(cap, pin).to_dict(), "known": child.store.known()}
