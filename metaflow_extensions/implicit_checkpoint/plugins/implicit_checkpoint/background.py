"""Asynchronous saves: commit in a forked child that sees a copy-on-write snapshot.

Why fork: a snapshot that must not change when the step mutates its arrays afterwards needs
either a copy of the state (as slow as writing it to the page cache) or the kernel's
copy-on-write. ``fork()`` takes about a millisecond per few hundred MB of memory mapped; the
child hashes and writes while the step runs on, and the only memory it costs is the pages the
step changes meanwhile (at most one copy of what changed, per pending save).

Guarantees:

- at most ``max_pending`` saves run at once; ``submit`` waits for the oldest beyond that, so
  memory cannot grow without bound when storage is slower than the step (back-pressure);
- the heap is not copied by garbage collections while children share it (``gc.freeze``
  in the step until the last child is reaped; no collections in the child);
- a child dies with its parent (``PR_SET_PDEATHSIG``): a crash loses the saves still pending,
  never a committed one, and no writer outlives its task;
- each child reports its result (the stored manifest, or the error) through a pipe; errors
  are re-raised in the step by ``poll``/``wait`` naming the checkpoint.

The child runs only code imported before the fork, never runs the garbage collector (which
would copy every page of the heap), writes no logs, and leaves by ``os._exit``.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import select
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

from .exceptions import CheckpointSaveError

_PR_SET_PDEATHSIG = 1


@dataclass
class _Child:
    pid: int
    fd: int
    key: str


class BackgroundSaves:
    """Forked commits of one task, at most ``max_pending`` at a time."""

    def __init__(self, max_pending: int = 2):
        self.max_pending = max_pending
        self._children: list[_Child] = []

    @staticmethod
    def available() -> bool:
        return hasattr(os, "fork") and sys.platform.startswith("linux")

    @property
    def pending(self) -> int:
        return len(self._children)

    def submit(self, key: str, work: Callable[[], dict]) -> list[dict]:
        """Run ``work`` in a child; return the results of saves that finished meanwhile."""
        done = self.poll()
        while len(self._children) >= self.max_pending:
            done.append(self._reap(self._children[0]))
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        # While a child shares the heap, a collection here would write to every object's
        # header and copy each page of the heap (torch's included) once per pending save:
        # objects that exist at the fork are left out of collections until no child is left.
        gc.freeze()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read_fd)
            _run_child(parent, write_fd, work)
        os.close(write_fd)
        self._children.append(_Child(pid, read_fd, key))
        return done

    def poll(self) -> list[dict]:
        """Results of the children that have finished, without waiting for the others."""
        if not self._children:
            return []
        ready, _, _ = select.select([c.fd for c in self._children], [], [], 0)
        return [self._reap(c) for c in list(self._children) if c.fd in ready]

    def wait(self) -> list[dict]:
        """Wait for every pending save; their results, oldest first."""
        return [self._reap(c) for c in list(self._children)]

    def _reap(self, child: _Child) -> dict:
        chunks = []
        while chunk := os.read(child.fd, 1 << 16):
            chunks.append(chunk)
        os.close(child.fd)
        _, status = os.waitpid(child.pid, 0)
        self._children.remove(child)
        if not self._children:
            gc.unfreeze()  # collected as usual again (garbage made meanwhile included)
        if chunks:
            return {"key": child.key, **json.loads(b"".join(chunks))}
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit code {os.WEXITSTATUS(status)}"
        return {"key": child.key, "ok": False, "error": f"the background writer died ({how})"}


def _run_child(parent: int, write_fd: int, work: Callable[[], dict]) -> None:
    # A collection would write to the header of every object of the task's heap (torch's
    # included), copying each of its pages: the child never collects, and exits soon.
    gc.disable()
    status = 0
    try:
        _die_with(parent)
        result = {"ok": True, **work()}
    except BaseException as exc:  # report everything: the parent decides what it means
        status = 1
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(limit=8)}
    try:
        data = json.dumps(result).encode()
        while data:
            data = data[os.write(write_fd, data):]
    finally:
        os._exit(status)


def _die_with(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def raise_failures(results: list[dict], where: str) -> None:
    """Turn failed background saves into one error naming each checkpoint."""
    failed = [r for r in results if not r.get("ok")]
    if failed:
        lines = "; ".join(f"{r['key']}: {r['error']}" for r in failed)
        raise CheckpointSaveError(
            f"Background save failed in {where} ({lines}). Those checkpoints were not "
            "written; earlier checkpoints are untouched. Fix the cause, or use "
            "@checkpoint(async_saves=False) to see the failure where save() is called."
        )
