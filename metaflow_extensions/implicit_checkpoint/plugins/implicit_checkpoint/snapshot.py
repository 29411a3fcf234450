"""Which attributes are the step's state.

The state is the public instance attributes present at save time (``vars(obj)``): those set
in this step, those restored by ``load()``, and upstream artifacts the step has read. Names
starting with ``_``, methods bound to the object, and the names the caller reserves
(Metaflow's own) are never state; other callables (lambdas, classes, callable models) are.
``include`` keeps only the named attributes; ``exclude`` drops the named ones.

How the selected attributes become bytes, as one object graph, is ``graph.py``'s job.
"""
from __future__ import annotations

import types
from typing import Any, Iterable, Optional

from .exceptions import CheckpointSaveError


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
