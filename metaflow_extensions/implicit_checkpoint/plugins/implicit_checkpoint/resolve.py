"""What a CLI argument names: a flow, run, step or task, found through Metaflow's client.

Inside a flow file (``python flow.py checkpoint list ...``) the flow is implied, as in
``card``: ``train`` is that step of the latest run, ``1732`` a run, ``1732/train`` a step,
``1732/train/4`` a task; a full pathspec starting with the flow's name works too. Without a flow
file (``mfcheckpoint``) a pathspec starts with the flow: ``TrainFlow`` (its latest run),
``TrainFlow/1732``, ``TrainFlow/1732/train``, ``TrainFlow/1732/train/4``. A latest run is
looked up in the current namespace; explicit pathspecs are found in any namespace.
"""
from __future__ import annotations

from typing import Any, Optional

from .cli import EXIT, CliError, Session
from .manifest import is_key_part

USAGE = "a step, a run id, 'run/step' or 'run/step/task'"
STANDALONE_USAGE = "'Flow', 'Flow/run', 'Flow/run/step' or 'Flow/run/step/task'"


def tasks_of(session: Session, target: Optional[str]) -> list[Any]:
    """The Metaflow ``Task`` objects ``target`` names (a run or step: all of its tasks)."""
    from metaflow import Run, Step, Task, namespace

    parts = _parts(session, target)
    namespace(None)
    if len(parts) == 4:
        return [Task("/".join(parts))]
    if len(parts) == 3:
        return sorted(Step("/".join(parts)), key=lambda t: t.pathspec)
    run = Run("/".join(parts))
    return sorted((task for step in run for task in step), key=lambda t: t.pathspec)


def run_pathspec(session: Session, target: str) -> str:
    """``Flow/run`` for a run named as ``run`` (in a flow file) or ``Flow/run``."""
    parts = _parts(session, target, latest=False)
    if len(parts) != 2:
        raise CliError(f"{target!r} is neither a checkpoint key nor a run; delete takes one of them.", EXIT["usage"])
    return "/".join(parts)


def _parts(session: Session, target: Optional[str], latest: bool = True) -> list[str]:
    parts = target.strip("/").split("/") if target else []
    if session.flow is not None and (not parts or parts[0] != session.flow):
        parts = [session.flow] + parts
    if not parts or len(parts) > 4 or not all(map(is_key_part, parts)):  # no "..", no odd names
        usage = USAGE if session.flow else STANDALONE_USAGE
        raise CliError(f"{target!r} is not {usage}.", EXIT["usage"])
    step_only = len(parts) == 2 and parts[1] in session.steps
    if latest and (len(parts) == 1 or step_only):
        parts.insert(1, _latest_run(parts[0]))
    elif step_only:
        raise CliError(f"{target!r} is a step; name a run (its id) instead.", EXIT["usage"])
    return parts


def _latest_run(flow: str) -> str:
    from metaflow import Flow, get_namespace

    run = Flow(flow).latest_run
    if run is None:
        raise CliError(f"Flow {flow} has no run in namespace {get_namespace()}.", EXIT["not found"])
    return run.id
