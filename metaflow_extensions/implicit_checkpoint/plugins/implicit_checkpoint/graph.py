"""The serialized form of a checkpoint: all attributes of a save as one pickle graph.

Every attribute is pickled by one pickler, one after another in name order, into one stream
with one memo. An object reached from two attributes (a model and the optimizer holding its
parameters, a scheduler and its optimizer, two names for one array) is written once and comes
back as one object, shared again exactly as before the save.

Large data leaves the stream as protocol-5 out-of-band buffers, in stream order: numpy arrays
by numpy's own reduction, CPU torch storages by ``tensors.py`` (views and tensors sharing a
storage store it once). Each buffer is a view of live memory (no copy on save) and is stored
under its own content hash (``writer.py``), so an unchanged tensor is never rewritten.

Classes and functions that the loading process can import by their qualified name travel by
reference, including module-level ones of the flow file, which Metaflow runs as ``__main__``
in every task: after ``load()`` ``type(self.model) is Model``, Metaflow's own artifact pickling
works, and an edited class is the one used. Lambdas, closures and local classes travel by
value (cloudpickle).

For each attribute the graph records its span of the stream, the buffers first written while
pickling it, and the other attributes it shares objects with. A partial load unpickles the
stream up to the last attribute it needs; it fetches the buffers of the requested attributes
and of those they share objects with, and gives the others empty stand-ins of the right size
(never touched, so they cost no memory), whose values are discarded.
"""
from __future__ import annotations

import contextvars
import enum
import io
import itertools
import operator
import pickle
import sys
import types
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import cloudpickle

from . import segments, tensors
from .exceptions import CheckpointRestoreError, CheckpointSaveError
from .files import Directory
from .snapshot import type_name

SERIALIZER = "graph-cloudpickle5"
# Objects that are values, not state two fields could share: the bulk of any big list, dropped
# at C speed before sharing is worked out. Others that are no state either (classes and
# functions stored by name, dtypes, devices, modules) are few, and dropped where found shared.
_ATOMS = frozenset({int, float, complex, bool, str, bytes, type(None), pickle.PickleBuffer})
_VALUE_BASES = (range, slice, enum.Enum, types.BuiltinFunctionType, types.ModuleType)
_TORCH_VALUES = {"dtype", "device", "layout", "memory_format", "qscheme", "finfo", "iinfo"}


# Which attribute is being loaded, for messages raised from inside unpickling (tensors.py).
loading_field: contextvars.ContextVar[str] = contextvars.ContextVar("loading_field", default="?")


@dataclass(frozen=True)
class Graph:
    """A state, serialized: the stream, its out-of-band buffers, and what each field holds."""

    body: bytes
    buffers: tuple  # memoryviews of live memory (or of host copies of device tensors)
    fields: dict  # name -> {"type", "size", "span", [buffers, shares, shape, dtype, device]}

    @property
    def size(self) -> int:
        return len(self.body) + sum(b.nbytes for b in self.buffers)


class _Pickler(cloudpickle.Pickler):
    def __init__(self, file: io.BytesIO):
        self.buffers: list = []
        # Pickle calls persistent_id for every object it meets, memo hits included, before
        # anything else: list.append (C, returns None) records them all, in order, at almost
        # no cost; which fields share objects is worked out from that afterwards (``_shares``).
        self.visited: list = []
        self.persistent_id = self.visited.append
        super().__init__(file, protocol=5, buffer_callback=self._take_buffer)
        self.torch = sys.modules.get("torch")  # no torch import unless the state has tensors
        self.storages: dict = {}  # id(storage) -> (StorageRef, storage): one buffer per storage

    def _take_buffer(self, buffer: pickle.PickleBuffer) -> None:
        self.buffers.append(buffer.raw())

    def reducer_override(self, obj: Any) -> Any:
        if self.torch is not None:
            if isinstance(obj, self.torch.Tensor):
                reduced = tensors.reduce_tensor(obj, self.storages)
                if reduced is not NotImplemented:
                    return reduced
            elif type(obj) is tensors.StorageRef:
                return obj.reduce()
        if isinstance(obj, (type, types.FunctionType)) and _in_main(obj):
            return NotImplemented  # by reference: pickle's own save_global
        return super().reducer_override(obj)


def _in_main(obj: Any) -> bool:
    """A class or function of ``__main__`` reachable there by its qualified name (cloudpickle
    would copy it by value; every task of a flow runs the flow file as ``__main__``)."""
    return getattr(obj, "__module__", None) == "__main__" and _is_global(obj)


def _is_global(obj: Any) -> bool:
    """Whether ``obj`` is what its module and qualified name lead to (pickled by reference)."""
    target: Any = sys.modules.get(getattr(obj, "__module__", None) or "")
    for part in getattr(obj, "__qualname__", "<").split("."):
        target = getattr(target, part, None)
    return target is obj


def encode(state: dict[str, Any], where: str, runs: Optional[segments.Segments] = None) -> Graph:
    """Pickle ``state`` (name -> value) as one graph, or fail naming the attribute. Long lists
    and big strings go as buffers (``segments.py``; ``runs`` keeps them from save to save),
    unless reached from elsewhere in the state too (they are then pickled as usual, shared)."""
    runs = runs or segments.Segments()
    with runs.saving():
        by_id: dict[int, Any] = {}  # one stand-in per object, however many names it has
        for value in state.values():
            if id(value) not in by_id:
                by_id[id(value)] = runs.wrap(value)
        wrapped = {n: by_id[id(v)] for n, v in state.items()}
        graph, seen = _encode(state, wrapped, where)
        aliased = {n for n, v in state.items() if wrapped[n] is not v and type(v) is list and id(v) in seen}
        if aliased:
            graph, _ = _encode(state, {**wrapped, **{n: state[n] for n in aliased}}, where)
    return graph


def _encode(state: dict[str, Any], wrapped: dict[str, Any], where: str) -> tuple[Graph, set]:
    stream = io.BytesIO()
    pickler = _Pickler(stream)
    spans: dict[str, tuple] = {}
    names = sorted(state)
    visits = []  # per field, where its objects start in pickler.visited
    for name in names:
        visits.append(len(pickler.visited))
        start, first_buffer = stream.tell(), len(pickler.buffers)
        try:
            pickler.dump(wrapped[name])
        except Exception as exc:
            raise CheckpointSaveError(
                f"Cannot checkpoint self.{name} ({type_name(state[name])}) in {where}: "
                f"{str(exc).rstrip('.')}. Leave it out with @checkpoint(exclude=[{name!r}]) and "
                "recreate it after load(); Metaflow also pickles every attribute when the step "
                f"ends, so `del self.{name}` before the step ends (or keep it off self). "
                "Earlier checkpoints are untouched."
            ) from exc
        spans[name] = (start, stream.tell(), first_buffer, len(pickler.buffers))
    shared, seen = _shares(names, pickler.visited, visits + [len(pickler.visited)])
    sizes = [b.nbytes for b in pickler.buffers]
    fields = {}
    for name, (start, end, b0, b1) in spans.items():
        fields[name] = {"type": type_name(state[name]), "size": end - start + sum(sizes[b0:b1]),
                        "span": [start, end], **describe(state[name])}
        if b1 > b0:  # omitted when empty: list() parses every manifest
            fields[name]["buffers"] = [b0, b1]
        if shared[name]:
            fields[name]["shares"] = sorted(shared[name])
    # Each buffer keeps what it views alive (a host copy of a device storage included).
    graph = Graph(stream.getvalue(), tuple(pickler.buffers), fields)
    # The pickler is in a reference cycle (its bound reducer_override), so it lives until the
    # garbage collector runs: drop what it holds now, or replaced states would stay alive.
    pickler.clear_memo()
    for held in (pickler.visited, pickler.storages, pickler.buffers):
        held.clear()  # in place: persistent_id is the visited list's own append
    return graph, seen


def _shares(names: list[str], visited: list, bounds: list[int]) -> tuple[dict[str, set], set]:
    """Which fields reach an object an earlier field reached (every object stays alive in
    ``visited`` meanwhile, so an id means one object), and the ids of every object reached.
    Filtering out atoms and intersecting runs in C; only objects found in two fields are
    looked at one by one."""
    shared: dict[str, set] = {n: set() for n in names}
    owner: dict[int, int] = {}  # id -> the first field that reached it
    for i in range(len(names)):
        objects = visited[bounds[i]:bounds[i + 1]]
        kept = list(itertools.compress(objects, map(operator.not_, map(_ATOMS.__contains__, map(type, objects)))))
        ids = set(map(id, kept))
        common = ids.intersection(owner)  # most often a few classes and dtypes
        if common:
            by_id = dict(zip(map(id, kept), kept))
            for j in {owner[k] for k in common if _is_state(by_id[k])} - {i}:
                shared[names[i]].add(names[j])
                shared[names[j]].add(names[i])
        owner.update(dict.fromkeys(ids - common, i))
    return shared, owner.keys()


def _is_state(obj: Any) -> bool:
    """False for objects that are no state to share: globals stored by name, dtypes, devices."""
    cls = type(obj)
    numpy = sys.modules.get("numpy")
    if isinstance(obj, _VALUE_BASES) or (numpy is not None and isinstance(obj, numpy.dtype)):
        return False
    if cls.__module__ == "torch" and cls.__name__ in _TORCH_VALUES:
        return False
    return not (isinstance(obj, (type, types.FunctionType)) and _is_global(obj))


def describe(value: Any) -> dict:
    """Shape, dtype (and device, for tensors) of an array-like attribute, the files of a
    ``Directory``, for ``inspect()``."""
    if isinstance(value, Directory):
        return value.describe()
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None or not hasattr(value, "ndim"):
        return {}
    found = {"shape": [int(n) for n in shape], "dtype": str(dtype)}
    device = getattr(value, "device", None)
    if device is not None and not isinstance(device, str):
        found["device"] = str(device)
    return found


def needed_buffers(fields: dict, wanted: Optional[Sequence[str]]) -> tuple[list[str], set[int]]:
    """The fields a load must restore (``wanted`` plus every field sharing objects with them)
    and the buffers it must fetch for them."""
    if wanted is None:
        closure = set(fields)
    else:
        closure, todo = set(), list(wanted)
        while todo:
            name = todo.pop()
            if name not in closure:
                closure.add(name)
                todo.extend(fields[name].get("shares", ()))
    indices = {i for n in closure for i in range(*fields[n].get("buffers", (0, 0)))}
    return sorted(closure), indices


def decode(body: bytes, buffers: list, fields: dict, wanted: Optional[Sequence[str]], needed: list[str],
           key: str, runs: Optional[segments.Segments] = None) -> dict[str, Any]:
    """Unpickle the fields ``wanted`` (all when ``None``) of a graph whose buffers are given
    in stream order (stand-ins where a field outside ``needed``, from ``needed_buffers``,
    owns them). Lists rebuilt from runs are remembered in ``runs``."""
    token = segments.adopting.set(runs)
    try:
        return _decode(body, buffers, fields, wanted, needed, key)
    finally:
        segments.adopting.reset(token)


def _decode(body: bytes, buffers: list, fields: dict, wanted: Optional[Sequence[str]], needed: list[str],
            key: str) -> dict[str, Any]:
    order = sorted(fields, key=lambda n: fields[n]["span"][0])
    last = max((order.index(n) for n in needed), default=-1)
    unpickler = _Unpickler(io.BytesIO(body), buffers=iter(buffers))
    values = {}
    for name in order[:last + 1]:
        token = loading_field.set(name)
        try:
            value = unpickler.load()
        except _MissingGlobal as exc:
            raise CheckpointRestoreError(
                f"Field {name!r} of checkpoint {key} needs {exc.args[0]}, which cannot be found "
                f"in this process ({exc.args[1]}). Define it at module level under that name "
                "(for the flow file, which Metaflow runs as __main__, at the top level of the "
                "file) or restore the code that defined it, then load again."
            ) from None
        except Exception as exc:
            raise CheckpointRestoreError(
                f"Field {name!r} of checkpoint {key} could not be restored: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        finally:
            loading_field.reset(token)
        if wanted is None or name in wanted:
            values[name] = value
    return values


class _MissingGlobal(Exception):
    pass


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError) as exc:
            raise _MissingGlobal(f"{module}.{name}", f"{type(exc).__name__}: {exc}") from None
