"""Which attributes are the step's state, and how each becomes bytes and back.

The state is the public instance attributes present at save time (``vars(obj)``): those set
in this step, those restored by ``load()``, and upstream artifacts the step has read. Names
starting with ``_``, methods bound to the object, and the names the caller reserves
(Metaflow's own) are never state; other callables (lambdas, classes, callable models) are.
``include`` keeps only the named attributes; ``exclude`` drops the named ones.

Each attribute is serialized on its own with cloudpickle (protocol 5), so lambdas, closures and
classes defined in the flow file round-trip, an attribute that cannot be serialized is named,
and large buffers stay out of band: they are written from where they lie in memory.
"""
from __future__ import annotations

import pickle
import struct
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Protocol

import cloudpickle

from .exceptions import CheckpointSaveError


class Serializer(Protocol):
    """Turns a value into a pickle-5 body plus out-of-band buffers, and back."""

    name: str

    def dumps(self, value: Any, buffer_callback: Callable[[pickle.PickleBuffer], None]) -> bytes: ...

    def loads(self, body: bytes, buffers: list) -> Any: ...


class CloudpickleSerializer:
    name = "cloudpickle5"

    def dumps(self, value: Any, buffer_callback: Callable[[pickle.PickleBuffer], None]) -> bytes:
        return cloudpickle.dumps(value, protocol=5, buffer_callback=buffer_callback)

    def loads(self, body: bytes, buffers: list) -> Any:
        return pickle.loads(body, buffers=buffers)


SERIALIZERS: dict[str, Serializer] = {"cloudpickle5": CloudpickleSerializer()}
DEFAULT_SERIALIZER = SERIALIZERS["cloudpickle5"]

# A payload is framed as: magic, buffer count, the length of the body and of each buffer, then
# the pickle body, then every out-of-band buffer (numpy arrays, anything with a contiguous
# buffer) exactly as it lies in memory, so large arrays are written and read without copies.
_MAGIC = b"MFC5"
_PREFIX = struct.Struct("<4sI")


@dataclass(frozen=True)
class Encoded:
    """One attribute, serialized: its frame parts (buffers are views of the live value)."""

    type: str
    serializer: str
    parts: tuple
    size: int


def encode(serializer: Serializer, name: str, value: Any, where: str) -> Encoded:
    """Serialize one attribute without copying its buffers, or fail naming it."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        body = serializer.dumps(value, buffers.append)
        views = [b.raw() for b in buffers]
    except Exception as exc:
        raise CheckpointSaveError(
            f"Cannot checkpoint self.{name} ({type_name(value)}) in {where}: {str(exc).rstrip('.')}. "
            f"Metaflow too pickles every attribute of self when the step ends, so keep it off self "
            f"(a local variable), or `del self.{name}` before the step ends and leave it out of checkpoints with "
            f"@checkpoint(exclude=[{name!r}]). Earlier checkpoints are untouched."
        ) from exc
    lengths = [len(body)] + [v.nbytes for v in views]
    header = _PREFIX.pack(_MAGIC, len(views)) + struct.pack(f"<{len(lengths)}Q", *lengths)
    parts = (header, body, *views)
    return Encoded(type_name(value), serializer.name, parts, len(header) + sum(lengths))


def read_frame_header(read: Callable[[int], bytes]) -> list[int]:
    """Lengths of the body and of each buffer, read from the start of a payload."""
    magic, count = _PREFIX.unpack(read(_PREFIX.size))
    if magic != _MAGIC:
        raise ValueError("not a framed payload")
    return list(struct.unpack(f"<{count + 1}Q", read(8 * (count + 1))))


def type_name(value: Any) -> str:
    """``int``, ``numpy.ndarray``, ``mymodule.Model``: what ``inspect()`` shows."""
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def select_state(
    attributes: dict[str, Any],
    *,
    reserved: Iterable[str] = (),
    include: Optional[list[str]] = None,
    exclude: Optional[list[str]] = None,
    where: str = "the step",
) -> dict[str, Any]:
    """Pick the attributes that make up the state, in name order."""
    reserved = set(reserved)
    if include is not None:
        missing = [n for n in include if n not in attributes]
        if missing:
            raise CheckpointSaveError(
                f"@checkpoint(include=...) in {where} names {', '.join(map(repr, missing))}, "
                "which is not set on self at save time. Set it before calling save(), or "
                "remove it from include=."
            )
        names = [n for n in include if n not in reserved]
    else:
        skip = reserved | set(exclude or ())
        names = [
            n
            for n, v in attributes.items()
            if not n.startswith("_") and n not in skip and not isinstance(v, types.MethodType)
        ]
    return {n: attributes[n] for n in sorted(names)}
