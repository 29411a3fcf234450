"""Multi-node steps: a local @parallel run of flows/train_parallel.py, node 1 killed at epoch 4;
each node's checkpoints are kept apart, the retry restores each node's own state, and the card
of node 0 shows every node."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from metaflow import Checkpoint, Run

from conftest import FLOWS, CardTables
from test_card import card_html

FLOW = FLOWS / "train_parallel.py"
# Metaflow starts a local @parallel step's other nodes with the `python` on PATH.
VENV_PATH = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def parallel_run(run_flow):
    result = run_flow(FLOW, "run", env=VENV_PATH)
    return result, Run(f"ParallelTrainFlow/{result.run_id}")


def test_each_node_resumes_its_own_state(parallel_run):
    """Node 0 resumes at its last epoch, node 1 at epoch 4, and both end with the weights of an
    uninterrupted run of their own shard (the join checks it, to the last bit)."""
    result, run = parallel_run
    assert "node 1: killed at epoch 4" in result.output and "node 1 attempt 1: starting at epoch 4" in result.output
    assert run["join"].task.data.resumed == {0: 8, 1: 4}
    weights = run["join"].task.data.weights
    assert weights[0] != weights[1]  # two different states: neither node took the other's


def test_node_checkpoints_are_kept_apart(parallel_run):
    """Each node's checkpoints live under its own task, at its node index as position, and hold
    only that node's state."""
    _, run = parallel_run
    tasks = sorted(run["train"], key=lambda t: t.pathspec)
    assert [t.pathspec.rsplit("/", 1)[1] for t in tasks] == ["2", "2_node_1"]
    for node, task in enumerate(tasks):
        checkpoints = Checkpoint().list(task=task)
        assert task.current_attempt == 1
        assert {c.key.split("/")[4] for c in checkpoints} == {str(node)}
        assert {c.metadata["node"] for c in checkpoints} == {node}
        assert [c.attempt for c in checkpoints] == ([0] * 8 if node == 0 else [1] * 4 + [0] * 4)
        assert [c.step for c in checkpoints] == list(range(8, 0, -1))
        assert Checkpoint().load(checkpoints[0])["node"] == node


def test_the_card_shows_every_node(parallel_run, run_flow):
    """Node 0's card lists both nodes with their newest checkpoint; node 1's card says which
    node it is."""
    result, run = parallel_run
    control = card_html(run_flow, FLOW, f"{result.run_id}/train/2")
    nodes = CardTables(control).rows("nodes")
    assert [(r["cells"][0], r["cells"][1], r["cells"][2], r["cells"][4]) for r in nodes] == [
        ("0", f"ParallelTrainFlow/{result.run_id}/train/2 (this task)", "8", "8"),
        ("1", f"ParallelTrainFlow/{result.run_id}/train/2_node_1", "8", "8"),
    ]
    assert "node=1" in nodes[1]["cells"][6] and "@parallel node 0 of 2" in control
    worker = card_html(run_flow, FLOW, f"{result.run_id}/train/2_node_1")
    assert "@parallel node 1 of 2" in worker and CardTables(worker).rows("nodes") == []
    assert len(CardTables(worker).rows("checkpoints")) == 8
    listed = run_flow(FLOW, "checkpoint", "list", f"{result.run_id}/train").proc.stdout
    assert len(re.findall(r"/train/2/0/", listed)) == 8 and len(re.findall(r"/train/2_node_1/1/", listed)) == 8


def test_node_positions_inside_a_foreach(tmp_path):
    """Inside a foreach, node i of branch 3 is at position 3.i; node_rows reads each node's
    count and newest checkpoint from those positions."""
    import types

    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.parallel import node_of, node_rows, parallel_nodes
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import open_store

    flow = types.SimpleNamespace(_control_mapper_tasks=["9/train/5", "9/train/5_node_1"],
                                 _parallel_ubf_iter=types.SimpleNamespace(num_parallel=2))
    nodes = parallel_nodes(flow, "3.0")
    assert nodes == [["5", "3.0"], ["5_node_1", "3.1"]] and node_of(flow, "3.1") == [1, 2]
    root = str(tmp_path / "ckpt")
    for saves, (task, position) in zip((2, 3), nodes):
        api = standalone(types.SimpleNamespace(n=0), root, TaskLocation("F", "9", "train", task, position))
        for n in range(saves):
            api._ctx.flow.n = n
            api.save(step=n)
        api.wait()
    rows = node_rows(Checkpointer(open_store(root)), TaskLocation("F", "9", "train", "5", "3.0"), nodes)
    assert [(r.pathspec, r.count, r.newest.step) for r in rows] == [("F/9/train/5", 2, 1), ("F/9/train/5_node_1", 3, 2)]
