"""How our errors read in a step: like Metaflow's own.

Metaflow prints a ``MetaflowException`` that leaves a step as it prints its own errors (headline,
file and line, message); any other exception as "Internal error" and a traceback. Our errors
(``exceptions.py``) stay plain exceptions, so that the core imports without Metaflow; at the
edge of the step they become ``CheckpointStepException``. Importing this module also makes
``current.checkpoint`` in a step without ``@checkpoint`` say so.
"""
from __future__ import annotations

import sys
import traceback

from metaflow.exception import MetaflowException
from metaflow.metaflow_current import Current

from .exceptions import CheckpointError


class CheckpointStepException(MetaflowException):
    """A ``CheckpointError`` leaving a step (inside the step it is still the ``CheckpointError``
    the user may catch)."""

    def __init__(self, error: CheckpointError, source_file: str):
        # Where in the flow file it was raised: Metaflow prints "in file ... on line ...".
        lines = [n for frame, n in traceback.walk_tb(error.__traceback__) if frame.f_code.co_filename == source_file]
        super().__init__(str(error), lines[-1] if lines else None, source_file if lines else None)
        self.headline = error.headline


class CheckpointMissingDecorator(MetaflowException, AttributeError):
    """``current.checkpoint`` where no ``@checkpoint`` set it. An ``AttributeError`` too, so
    ``hasattr(current, "checkpoint")`` stays False."""

    headline = "No @checkpoint on this step"


def _no_checkpoint(current_) -> None:
    step = current_.step_name
    where = f"step {step!r} has no @checkpoint" if step else "this is not a running step"
    caller = sys._getframe(1) if step else None  # in a task: the line that read current.checkpoint
    raise CheckpointMissingDecorator(
        f"current.checkpoint is used but {where}. Add @checkpoint above @step "
        "(from metaflow import checkpoint), or run with --with checkpoint.",
        caller and caller.f_lineno, caller and caller.f_code.co_filename,
    )


# What `current.checkpoint` is until @checkpoint's task_pre_step sets the real one (Metaflow
# sets `current`'s attributes as properties of its class, so this one is replaced).
if not hasattr(Current, "checkpoint"):
    Current.checkpoint = property(_no_checkpoint)
