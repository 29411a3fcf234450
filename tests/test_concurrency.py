"""Concurrent writers on one root, as separate processes (benchmarks/kill_child.py)."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.storage_options import storage_options
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import CheckpointStore

sys.path.insert(0, str(REPO / "benchmarks"))
from kill_child import check  # noqa: E402

SAVES = 10


def writer(root, task, attempt):
    return subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "kill_child.py"), root, "--task", f"ConcFlow/1/work/{task}",
         "--attempt", str(attempt), "--saves", str(SAVES)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def saved_keys(lines):
    return [line.split()[2] for line in lines if line.startswith("saved ")]


def test_eight_tasks_and_two_overlapping_attempts_lose_nothing_and_never_mix(shared_root_url):
    """Ten processes save to one root at once: eight foreach tasks, and a second attempt of task 0
    started while the first still runs (a scheduler retrying a task it thought lost). Every
    acknowledged save is listed, each checkpoint holds exactly one writer's state, and a third
    attempt resumes from the newest checkpoint of either."""
    first = writer(shared_root_url, 0, 0)
    head = [first.stdout.readline() for _ in range(4)]  # "fresh" and three saves: now overlap it
    writers = {(0, 0): first, (0, 1): writer(shared_root_url, 0, 1)}
    writers.update({(t, 0): writer(shared_root_url, t, 0) for t in range(1, 8)})
    out = {}
    for key, proc in writers.items():
        if key == (0, 0):  # read on through the buffered reader the head came from: communicate()
            stdout, stderr = proc.stdout.read(), proc.stderr.read()  # would skip what it buffered
            proc.wait(timeout=240)
        else:
            stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        out[key] = (head if key == (0, 0) else []) + stdout.splitlines()

    cp = Checkpointer(CheckpointStore(shared_root_url, storage_options(shared_root_url)))
    for task in range(8):
        loc = TaskLocation("ConcFlow", "1", "work", str(task))
        listed = cp.list(loc)
        acked = [k for (t, _), lines in out.items() if t == task for k in saved_keys(lines)]
        assert sorted(a.key for a in listed) == sorted(acked) and len(acked) == SAVES * (2 if task == 0 else 1)
        for artifact in listed:
            assert check(cp.restore(artifact), artifact.metadata) == ""
            assert artifact.metadata["tag"] == f"a{artifact.attempt}"

    loc0 = TaskLocation("ConcFlow", "1", "work", "0")
    resumed = out[(0, 1)][0].split()
    assert resumed[0] == "resumed" and int(resumed[2]) >= 2  # the second attempt took over mid-way
    newest = cp.list(loc0)[0]  # the later attempt's last save, whatever the clocks said
    assert newest.attempt == 1 and newest.metadata["i"] == max(c.metadata["i"] for c in cp.list(loc0, attempt=1))
    assert cp.find_resumable(loc0, 2, other_runs=False, namespace=None).key == newest.key
