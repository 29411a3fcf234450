"""Multi-node (``@parallel``) steps: which tasks are a step's nodes, and what each has saved.

Each node of a ``@parallel`` step is a task of its own, and Metaflow runs node ``i`` with split
index ``i``: the innermost foreach frame, so the node index ends its checkpoints' position
(``1``, or ``2.1`` inside a foreach) and every node's checkpoints are kept apart, across runs
too. Node 0 is the control task; once its step runs it knows every node's task (Metaflow's
``_control_mapper_tasks``), which its card lists with each node's newest checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .checkpointer import Checkpointer
from .exceptions import CheckpointError
from .manifest import CheckpointArtifact, TaskLocation
from .marks import live_ids


@dataclass(frozen=True)
class NodeRow:
    """One node of a @parallel step, on node 0's card: its task and newest checkpoint."""

    index: int
    pathspec: str
    count: int
    newest: Optional[CheckpointArtifact]
    problem: Optional[str] = None


def node_of(flow: Any, position: str) -> list:
    """[node index, number of nodes] of the running @parallel task."""
    nodes = getattr(getattr(flow, "_parallel_ubf_iter", None), "num_parallel", 0)
    return [int(position.rpartition(".")[2]), nodes]


def parallel_nodes(flow: Any, position: str) -> list:
    """[task id, position] of every node, node 0 first, as the control task (node 0) knows them
    once the step runs; ``[]`` in the other nodes."""
    tasks = getattr(flow, "_control_mapper_tasks", None) or []
    outer = position.rpartition(".")[0]
    return [[task.rsplit("/", 1)[1], f"{outer}.{i}" if outer else str(i)] for i, task in enumerate(tasks)]


def node_rows(checkpointer: Checkpointer, here: TaskLocation, nodes: list) -> tuple[NodeRow, ...]:
    """Each node's checkpoint count and newest checkpoint (one listing and one manifest read
    per node, however many checkpoints it has). ``nodes``: ``parallel_nodes``' answer."""
    rows = []
    for index, (task, position) in enumerate(nodes):
        loc = TaskLocation(here.flow, here.run, here.step, task, position)
        try:
            found = live_ids(checkpointer.store, loc)
            newest = checkpointer.read(loc.key(found[-1])) if found else None
            rows.append(NodeRow(index, loc.pathspec, len(found), newest))
        except CheckpointError as exc:
            rows.append(NodeRow(index, loc.pathspec, 0, None, f"cannot be read: {exc}"))
    return tuple(rows)
