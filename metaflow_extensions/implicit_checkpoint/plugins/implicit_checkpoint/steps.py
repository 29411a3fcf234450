"""Step-indexed checkpoints: the newest checkpoint saved with ``save(step=N)``.

``save(step=N)`` records a training step or epoch in the manifest (``CheckpointArtifact.step``),
so a user can go back to "epoch 40" without knowing a key. The step is not part of the
checkpoint id, so finding one reads manifests: the task's own (one listing, as ``list()``),
then, for ``load_policy="eager"``, those of the same step position in other runs, newest first.
An explicit ``load(step=N)`` that finds nothing is an error naming the steps that exist.
"""
from __future__ import annotations

from typing import Iterable, Optional

from .checkpointer import Checkpointer
from .exceptions import CheckpointNotFound
from .manifest import CheckpointArtifact, TaskLocation
from .writer import check_step

SHOWN_STEPS = 20


def find_step(
    checkpointer: Checkpointer, loc: TaskLocation, step: int, *, other_runs: bool,
    namespace: Optional[str], where: str,
) -> CheckpointArtifact:
    """The newest checkpoint of task ``loc`` saved with ``step``; with ``other_runs``, else the
    newest of the same flow, step and position in other runs of ``namespace``."""
    step = check_step(step, where, call="load")
    seen = checkpointer.list(loc)
    found = next((a for a in seen if a.step == step), None)
    if found is None and other_runs:
        others = []
        for artifact in checkpointer.other_runs(loc, namespace):
            if artifact.step == step:
                return artifact
            others.append(artifact)
        seen += others
    if found is None:
        scope = " or in other runs at its position" if other_runs else ""
        raise CheckpointNotFound(
            f"No checkpoint with step {step} in {where}{scope}; {steps_text(seen)}"
        )
    return found


def steps_text(artifacts: Iterable[CheckpointArtifact]) -> str:
    """What steps exist, for an error message: ``the steps saved are 0, 10, 20.``"""
    steps = sorted({a.step for a in artifacts if a.step is not None})
    if not steps:
        return "none of its checkpoints has a step: save them with current.checkpoint.save(step=N)."
    shown = ", ".join(map(str, steps[:SHOWN_STEPS])) + (f", ... ({len(steps)} in all)" if len(steps) > SHOWN_STEPS else "")
    return f"the steps saved are {shown}. Load one of them, or load() without step= for the newest."
