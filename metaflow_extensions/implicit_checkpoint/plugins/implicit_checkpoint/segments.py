"""Growing state costs its growth: long lists and big strings leave the stream as buffers.

An LLM batch job appends a result to ``self.results`` and saves, thousands of times. Pickled
as usual, each save would re-pickle and rewrite the whole list. Instead, a long list of atoms
(str, bytes, int, float, bool, None, complex) that is an attribute of the step is pickled as
*runs*: consecutive items, about ``RUN_BYTES`` of them, pickled once and kept (``Segments``),
each an out-of-band buffer stored by content (``payloads.py``); only the items after the last
full run (the tail, under ``RUN_BYTES``) are pickled again at each save. Once ``FAN`` runs of
one level follow each other they are joined into one run of the next level (their bytes
concatenated, not pickled again), so a list of any length has a few dozen runs, and the
manifest stays small: an appended item costs its own bytes, the tail and a few chunk names.

Only items of immutable types are kept: the runs of a list are reused exactly when its first
items are still the very same objects (``operator.is_`` over them, at C speed), which proves
nothing changed. Anything else (a list of dicts, an item replaced) is pickled as usual or its
runs rebuilt. A list reached from anywhere else in the state as well is pickled as usual, so it
comes back shared (``graph.py`` checks).

Strings and bytes of at least ``BIG_BYTES`` that are attributes become one buffer each (the
string's UTF-8 bytes), cut into chunks at fixed offsets: text appended to a transcript rewrites
its last chunk only.

After ``load()`` the lists rebuilt from runs are remembered with their runs, so the next save
writes nothing for them. What a ``Segments`` keeps costs about the pickled size of the long
lists of the state (each run's bytes), and is dropped for lists no longer in the state.
"""
from __future__ import annotations

import contextlib
import contextvars
import io
import operator
import pickle
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

RUN_BYTES = 6 << 10  # above INLINE_MAX: a run is stored apart, not inside every manifest
FAN = 16
TOP_LEVEL = 2  # runs of about 1.5 MiB join no further
MIN_ITEMS = 32
BIG_BYTES = 64 << 10
_ATOMS = frozenset({str, bytes, int, float, bool, complex, type(None)})
_FIXED = frozenset({int, float, bool, complex, type(None)})


@dataclass
class _Run:
    level: int
    count: int
    payload: Any  # bytes-like: pickled lists of items, back to back


@dataclass
class _Entry:
    items: list  # the list itself: keeps its id meaningful
    sealed: list = field(default_factory=list)  # the items the runs hold, in order
    runs: list = field(default_factory=list)


class Segments:
    """The runs of each long list (and the bytes of each big string) of one task's state, from
    its last save or load, by identity."""

    def __init__(self) -> None:
        self._lists: dict[int, _Entry] = {}
        self._strings: dict[int, tuple] = {}
        self._next_lists: dict[int, _Entry] = {}
        self._next_strings: dict[int, tuple] = {}

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """One save: what it did not use is forgotten after it."""
        self._next_lists, self._next_strings = {}, {}
        yield
        self._lists, self._strings = self._next_lists, self._next_strings

    def wrap(self, value: Any) -> Any:
        """What to pickle for the attribute ``value``: a stand-in for a long list of atoms or a
        big string, else ``value`` itself."""
        kind = type(value)
        if kind is list and len(value) >= MIN_ITEMS:
            return self._wrap_list(value)
        if kind is str and len(value) >= BIG_BYTES:
            return _Buffer(rebuild_str, self._utf8(value))
        if kind is bytes and len(value) >= BIG_BYTES:
            return _Buffer(bytes, value)
        return value

    def _utf8(self, text: str) -> bytes:
        known = self._strings.get(id(text))
        encoded = known[1] if known and known[0] is text else text.encode("utf-8", "surrogatepass")
        self._next_strings[id(text)] = (text, encoded)
        return encoded

    def _wrap_list(self, items: list) -> Any:
        entry = self._lists.get(id(items)) or self._next_lists.get(id(items))
        if entry is None or entry.items is not items or not _still_first(items, entry.sealed):
            entry = _Entry(items)
        if not all(map(_ATOMS.__contains__, map(type, items[len(entry.sealed):]))):
            return items
        _seal(entry)
        self._next_lists[id(items)] = entry
        return _Runs(tuple((r.level, r.count) for r in entry.runs), [r.payload for r in entry.runs],
                     items[len(entry.sealed):])

    def adopt(self, items: list, runs: list) -> None:
        """Remember a list just rebuilt from its runs (by ``load()``)."""
        sealed = items[:sum(r.count for r in runs)]
        self._lists[id(items)] = _Entry(items, sealed, runs)


def _still_first(items: list, sealed: list) -> bool:
    """Whether ``items`` still starts with exactly the objects ``sealed`` (atoms: unchanged)."""
    return len(items) >= len(sealed) and all(map(operator.is_, items, sealed))


def _seal(entry: _Entry) -> None:
    """Cut full runs from the items after the sealed ones, joining runs as they accumulate."""
    items, start = entry.items, len(entry.sealed)
    for end in _cuts(items, start):
        batch = items[start:end]
        entry.runs.append(_Run(0, len(batch), pickle.dumps(batch, protocol=5)))
        entry.sealed.extend(batch)
        start = end
        _join_full_levels(entry.runs)


def _cuts(items: list, start: int) -> Iterator[int]:
    """Where runs end: after every ``RUN_BYTES`` of items (numbers: counted, not measured)."""
    if start < len(items) and type(items[start]) in _FIXED:
        step = RUN_BYTES // 9
        if _FIXED.issuperset(map(type, items[start:])):
            yield from range(start + step, len(items) + 1, step)
            return
    size = 0
    for i in range(start, len(items)):
        item = items[i]
        size += len(item) + 8 if type(item) in (str, bytes) else 9
        if size >= RUN_BYTES:
            yield i + 1
            size = 0


def _join_full_levels(runs: list) -> None:
    while len(runs) >= FAN and runs[-1].level < TOP_LEVEL and all(r.level == runs[-1].level for r in runs[-FAN:]):
        group = runs[-FAN:]
        del runs[-FAN:]
        runs.append(_Run(group[0].level + 1, sum(r.count for r in group), b"".join(r.payload for r in group)))


class _Runs:
    """A long list, pickled as its runs (out-of-band buffers) and its tail."""

    __slots__ = ("meta", "payloads", "tail")

    def __init__(self, meta: tuple, payloads: list, tail: list):
        self.meta, self.payloads, self.tail = meta, payloads, tail

    def __reduce_ex__(self, protocol: int) -> tuple:
        return rebuild_list, (self.meta, *map(pickle.PickleBuffer, self.payloads), self.tail)


class _Buffer:
    """A big string or bytes, pickled as one out-of-band buffer."""

    __slots__ = ("rebuild", "data")

    def __init__(self, rebuild: Any, data: bytes):
        self.rebuild, self.data = rebuild, data

    def __reduce_ex__(self, protocol: int) -> tuple:
        return self.rebuild, (pickle.PickleBuffer(self.data),)


# The Segments that lists rebuilt by a load are remembered in (set by graph.decode).
adopting: contextvars.ContextVar[Optional[Segments]] = contextvars.ContextVar("adopting", default=None)


def rebuild_list(meta: tuple, *parts: Any) -> list:
    """A list from its runs (each pickled lists, back to back) and its tail."""
    *read, tail = parts
    payloads = [bytes(p) for p in read]  # bytes: immutable, so a save needs no copy of them
    items: list = []
    for (_, count), payload in zip(meta, payloads):
        stream, size, before = io.BytesIO(payload), memoryview(payload).nbytes, len(items)
        while stream.tell() < size:
            items.extend(pickle.load(stream))
        if len(items) - before != count:
            raise ValueError(f"a run holds {len(items) - before} items, its manifest says {count}")
    items.extend(tail)
    segments = adopting.get()
    if segments is not None:
        segments.adopt(items, [_Run(level, count, p) for (level, count), p in zip(meta, payloads)])
    return items


def rebuild_str(data: Any) -> str:
    return str(data, "utf-8", "surrogatepass")
