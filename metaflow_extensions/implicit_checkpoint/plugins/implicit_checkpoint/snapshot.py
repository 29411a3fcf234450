"""Which attributes are the step's state, and how each becomes bytes and back.

The state is the public instance attributes present at save time (``vars(obj)``): those set
in this step, those restored by ``load()``, and upstream artifacts the step has read. Names
starting with ``_``, methods bound to the object, and the names the caller reserves
(Metaflow's own) are never state; other callables (lambdas, classes, callable models) are. ``include`` keeps only the named attributes; ``exclude`` drops the named ones.

Each attribute is serialized on its own with cloudpickle, so lambdas, closures and classes
defined in the flow file round-trip, and an attribute that cannot be serialized is named.
"""
from __future__ import annotations

import types
from typing import Any, Iterable, Optional, Protocol

import cloudpickle

from .exceptions import CheckpointSaveError


class Serializer(Protocol):
    name: str

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class CloudpickleSerializer:
    name = "cloudpickle"

    def dumps(self, value: Any) -> bytes:
        return cloudpickle.dumps(value, protocol=5)

    def loads(self, data: bytes) -> Any:
        return cloudpickle.loads(data)


SERIALIZERS: dict[str, Serializer] = {"cloudpickle": CloudpickleSerializer()}


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


def serialize_field(serializer: Serializer, name: str, value: Any, where: str) -> bytes:
    """Serialize one attribute, or fail naming it and how to leave it out."""
    try:
        return serializer.dumps(value)
    except Exception as exc:
        raise CheckpointSaveError(
            f"Cannot checkpoint self.{name} ({type_name(value)}) in {where}: {str(exc).rstrip('.')}. "
            f"Leave it out with @checkpoint(exclude=[{name!r}]) and recreate it after "
            "load(). Earlier checkpoints are untouched."
        ) from exc
