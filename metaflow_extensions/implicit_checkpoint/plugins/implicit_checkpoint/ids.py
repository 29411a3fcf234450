"""Checkpoint ids, and the order they define: which checkpoint is newest, without any clock.

An id is ``a<attempt>-<tick>-<created>-<random>``, e.g. ``a001-000000017-20261130T132000Z-0123abcd``:

- ``attempt``: Metaflow runs a task's attempts one after another, so every checkpoint of a later
  attempt is newer than every checkpoint of an earlier one, whatever the machines' clocks say.
- ``tick``: a logical clock (Lamport's) kept by each process. Each new id takes a tick one
  above the last one this process issued *or saw*: a process sees the ids of every checkpoint it
  lists (its own task's when it first saves; the whole foreach position's for
  ``load_policy="eager"``) or loads. So within one attempt (one process) ticks only grow, and a
  checkpoint is always newer than any checkpoint its run could have resumed from.
- ``created``: the writer's wall clock, to the second, for people only; nothing orders by it.

Within a task, newest means the highest (attempt, tick). Across runs (``eager``), newest means the
highest tick: a run that resumed from another run's checkpoint ticks past it, so its saves are
newer however far its clock is behind. Runs that never saw each other's checkpoints (they ran
at the same time) are ordered by how far their ticks got, then by run id.

Ids of version 0.x (``20260101T000000000000Z-a0-0123abcd``, ordered by the writer's clock)
are still read; they sort before any new id of the same attempt, in their old order.
"""
from __future__ import annotations

import re
import secrets
import threading
from datetime import datetime, timezone
from typing import Optional

ID_RE = re.compile(r"a(\d{3,9})-(\d{9,18})-\d{8}T\d{6}Z-[0-9a-f]{8}")
OLD_ID_RE = re.compile(r"(\d{8}T\d{12}Z)-a(\d{1,9})-[0-9a-f]{8}")
EXAMPLE = "a000-000000001-20260101T000000Z-0123abcd"
_ISO = "%Y-%m-%dT%H:%M:%S.%fZ"

_lock = threading.Lock()
_tick = [0]


def is_id(text: str) -> bool:
    """True for a checkpoint id, new or old (the whole string, no trailing newline)."""
    return isinstance(text, str) and bool(ID_RE.fullmatch(text) or OLD_ID_RE.fullmatch(text))


def new_id(attempt: int) -> tuple[str, str]:
    """A fresh (checkpoint id, ISO-8601 ``created_on``) pair; ids from one process only grow."""
    with _lock:
        _tick[0] += 1
        tick = _tick[0]
    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    return f"a{attempt:03d}-{tick:09d}-{stamp}-{secrets.token_hex(4)}", now.strftime(_ISO)


def observe(ids) -> None:
    """Move this process's logical clock past every id seen (ids of any task or run)."""
    seen = max((tick_of(i) for i in ids), default=0)
    with _lock:
        if seen > _tick[0]:
            _tick[0] = seen


def in_task_order(names) -> list[str]:
    """The checkpoint ids among ``names``, oldest first (``task_order``), and this process's
    clock moved past them: one pass, one match per name (a task may hold 10,000)."""
    keyed, top = [], 0
    for name in names:
        new = ID_RE.fullmatch(name)
        if new:
            tick = int(new.group(2))
            top = max(top, tick)
            keyed.append(((int(new.group(1)), 1, tick, name), name))
        elif OLD_ID_RE.fullmatch(name):
            keyed.append((task_order(name), name))
    keyed.sort()
    with _lock:
        _tick[0] = max(_tick[0], top)
    return [name for _, name in keyed]


def attempt_of(checkpoint_id: str) -> int:
    new = ID_RE.fullmatch(checkpoint_id)
    if new:
        return int(new.group(1))
    old = OLD_ID_RE.fullmatch(checkpoint_id)
    return int(old.group(2)) if old else 0


def tick_of(checkpoint_id: str) -> int:
    """The logical time of an id (0 for old ids, which have none)."""
    new = ID_RE.fullmatch(checkpoint_id)
    return int(new.group(2)) if new else 0


def task_order(checkpoint_id: str) -> tuple:
    """Sort key within one task: attempt, then tick (old ids: their clock, before new ones)."""
    new = ID_RE.fullmatch(checkpoint_id)
    if new:
        return (int(new.group(1)), 1, int(new.group(2)), checkpoint_id)
    return (attempt_of(checkpoint_id), 0, 0, checkpoint_id)  # old ids sort as strings by time


def run_order(checkpoint_id: str, run: Optional[str] = None) -> tuple:
    """Sort key across runs of one foreach position: tick, then run, then the order in a task."""
    return (tick_of(checkpoint_id), _run_key(run), task_order(checkpoint_id))


def _run_key(run: Optional[str]) -> tuple:
    if run is None:
        return (0, 0, "")
    return (1, int(run), "") if run.isdigit() else (2, 0, run)
