"""Small saves, written by one background thread: ``save()`` never waits on storage.

A small save is captured in the step (pickled, its mutable buffers copied: it is small) and
handed to the writer thread, which commits it (``Checkpointer.commit``) while the step runs on.

Batching: the writer commits each save as soon as it is free, and the saves waiting meanwhile
hold only the newest save of each name (and step: saves with different ``step=`` numbers are
all kept, as a user asks for them by step). A save that arrives while an older one of the same
name still waits replaces it: the older one is never written (it is *superseded*; the newer
one holds everything it held, and takes its parent, so lineage has no gap). So a loop that
saves faster than storage writes has its newest state written each time the writer is free,
while a loop that saves once a second writes every save. At most ``MAX_WAITING`` names wait:
a save of yet another name waits for room (back-pressure: memory stays bounded).

Flushing (``wait``): every pending save is written at once, in order, and ``wait`` returns when
all are durable. ``save(wait=True)``, ``wait()``, every read in the step and the end of the step
(success or failure) flush. A crash loses the pending saves (at most the newest waiting save of
each name, plus the one being written), never a committed one.

Right after each commit the thread calls ``on_commit`` (cheap and thread-safe: the card's
"refresh soon"), so a checkpoint shows on the live card while the step computes on. Results
(the stored checkpoint, or the error) are handed back to the step, which settles them
(``poll``/``wait``): retention and errors run in the step's own thread.
"""
from __future__ import annotations

import atexit
import contextlib
import threading
import weakref
from dataclasses import replace
from typing import Callable, Iterator, Optional

from .manifest import CheckpointArtifact
from .writer import Capture

MAX_WAITING = 8


class BatchedSaves:
    """One writer thread for one task's small saves."""

    def __init__(self, commit: Callable[[Capture], CheckpointArtifact],
                 on_commit: Callable[[CheckpointArtifact], None] = lambda artifact: None):
        self._commit, self._on_commit = commit, on_commit
        self._cond = threading.Condition()
        self._pending: dict[tuple, Capture] = {}  # (name, step) -> newest capture, oldest first
        self._superseded: dict[str, Optional[str]] = {}  # key never written -> its parent
        self._results: list[dict] = []
        self._busy = False
        self._thread: Optional[threading.Thread] = None
        self._committing = threading.Lock()  # held while a commit runs (see ``quiet``)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending) + self._busy

    def submit(self, cap: Capture) -> list[dict]:
        """Queue ``cap``, superseding a pending save of the same name; return the results of
        saves written meanwhile."""
        with self._cond:
            self._start()
            while _slot(cap) not in self._pending and len(self._pending) >= MAX_WAITING:
                self._cond.wait()
            self._drop(_slot(cap))
            self._pending[_slot(cap)] = cap
            self._cond.notify_all()
            return self._take()

    def parent_of(self, key: Optional[str]) -> Optional[str]:
        """The nearest ancestor of ``key`` that was (or will be) written."""
        with self._cond:
            while key in self._superseded:
                key = self._superseded[key]
            return key

    def supersede(self, cap: Capture) -> None:
        """Drop the pending save ``cap`` supersedes (``cap`` goes another way)."""
        with self._cond:
            self._drop(_slot(cap))

    def _drop(self, slot: tuple) -> None:
        older = self._pending.pop(slot, None)
        if older is not None:
            self._superseded[older.key] = older.parent
            if len(self._superseded) > 1024:  # only the newest saves' parents are ever asked for
                del self._superseded[next(iter(self._superseded))]

    def poll(self) -> list[dict]:
        with self._cond:
            return self._take()

    def wait(self) -> list[dict]:
        """Wait until every pending save is written; return all results not yet returned."""
        with self._cond:
            while self._pending or self._busy:
                self._cond.wait()
            return self._take()

    def quiet(self) -> "threading.Lock":
        """Held, no commit runs (the step holds it around a fork, so the child inherits no
        lock the writer held)."""
        return self._committing

    def _take(self) -> list[dict]:
        done, self._results = self._results, []
        return done

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
            self._thread.start()
            atexit.register(_flush_at_exit, weakref.ref(self))  # scripts and notebooks too

    def _run(self) -> None:
        for cap in self._next():
            with self._committing:
                try:
                    cap = replace(cap, parent=self.parent_of(cap.parent))
                    result = {"key": cap.key, "ok": True, "artifact": self._commit(cap)}
                except BaseException as exc:  # reported in the step, naming the checkpoint
                    result = {"key": cap.key, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            if result["ok"]:
                with contextlib.suppress(Exception):  # a card that cannot refresh fails no save
                    self._on_commit(result["artifact"])
            with self._cond:
                self._busy = False
                self._results.append(result)
                self._cond.notify_all()

    def _next(self) -> Iterator[Capture]:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                cap = self._pending.pop(next(iter(self._pending)))  # the oldest
                self._busy = True
                self._cond.notify_all()  # room for a save of another name
            yield cap


def _slot(cap: Capture) -> tuple:
    return cap.name, cap.step


def _flush_at_exit(ref: "weakref.ref[BatchedSaves]") -> None:
    saves = ref()
    if saves is not None:
        saves.wait()
