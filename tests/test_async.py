"""Asynchronous saves: captured at save(), durable by wait() or step end, bounded in memory."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from faults import FaultyFileSystem
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import CheckpointSaveError
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation

MB = 1 << 20


def make_api(root: str, attempt: int = 0, async_saves: bool = True):
    flow = types.SimpleNamespace()
    return flow, standalone(flow, root, TaskLocation("F", "1", "train", "2"), attempt, async_saves)


@pytest.fixture
def faulty(tmp_path, monkeypatch):
    monkeypatch.setattr(FaultyFileSystem, "write_delay", 0.0)
    monkeypatch.setattr(FaultyFileSystem, "fail_paths", ())
    return f"faultyfile://{tmp_path}/root"


def test_snapshot_is_the_state_at_save_time(tmp_path):
    """An array changed in place right after an asynchronous save() restores its old values."""
    flow, api = make_api(str(tmp_path))
    flow.w = np.arange(4 * MB, dtype=np.float64)  # 32 MB (no two chunks alike): written in the background
    pending = api.save()
    assert "body" not in pending.implicit_manifest  # returned before hashing
    flow.w[:] = 7.0
    (stored,) = api.wait()
    assert stored.key == pending.key and stored.written == flow.w.nbytes + len(open(stored.url[7:], "rb").read())
    _, later = make_api(str(tmp_path), attempt=1)
    later.load()
    assert np.array_equal(later._ctx.flow.w, np.arange(4 * MB, dtype=np.float64))


def test_unchanged_async_save_writes_no_payload(tmp_path):
    """Saving an unchanged large state again, in the background, writes only a manifest."""
    flow, api = make_api(str(tmp_path))
    flow.w = np.ones(2 * MB)
    api.save(wait=True)
    api.save()
    (second,) = api.wait()
    assert second.written == len(open(second.url[7:], "rb").read())  # the manifest alone


def test_background_failure_surfaces_at_wait_naming_the_checkpoint(faulty, monkeypatch):
    """A write that fails in the background raises at wait(), names the checkpoint, and
    leaves the previous checkpoint loadable."""
    flow, api = make_api(faulty)
    flow.w = np.ones(2 * MB)
    good = api.save(wait=True)
    monkeypatch.setattr(FaultyFileSystem, "fail_paths", ("/objects/",))
    flow.w = np.zeros(2 * MB)
    bad = api.save()
    with pytest.raises(CheckpointSaveError, match=f"Background save failed .*{bad.key}: CheckpointStorageError: Could not write payload .*injected write failure"):
        api.wait()
    assert [a.key for a in api.list()] == [good.key]
    _, later = make_api(faulty, attempt=1)
    assert later.load().key == good.key and later._ctx.flow.w.sum() == 2 * MB


def test_background_failure_surfaces_at_the_next_save(faulty, monkeypatch):
    """If nobody waits, the next save() raises the earlier background failure."""
    flow, api = make_api(faulty)
    flow.n = 1
    api.save()  # the first save checks that the root is writable: let it pass
    monkeypatch.setattr(FaultyFileSystem, "fail_paths", ("/objects/",))
    flow.w = np.ones(2 * MB)
    bad = api.save()
    monkeypatch.setattr(FaultyFileSystem, "fail_paths", ())
    # New values: had the next save rewritten the same payload, a writer scheduled late would
    # have found it stored and (rightly) succeeded.
    flow.w = np.zeros(2 * MB)
    with pytest.raises(CheckpointSaveError, match=bad.key):
        api.save(wait=True)


def _pss_kb(pid: int) -> int:
    """Proportional set size of a process (0 once it has exited)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise AssertionError("no Pss line")


def test_slow_storage_applies_back_pressure_and_bounds_memory(faulty, monkeypatch):
    """With storage slower than the step, at most two saves are pending, and the memory of the
    step plus its writers stays within the state plus two pending snapshots."""
    monkeypatch.setattr(FaultyFileSystem, "write_delay", 0.3)
    flow, api = make_api(faulty)
    size = 64 * MB  # large beside the interpreter pages a fork copies (tens of MB with torch imported)
    flow.w = np.zeros(size // 8)
    baseline = _pss_kb(os.getpid()) * 1024
    peak = 0
    for i in range(6):
        flow.w = np.full(size // 8, float(i))  # a new array each time: old ones live on in writers
        api.save()
        assert api.pending <= 2
        pids = [os.getpid()] + [c.pid for c in api._saver.forked_children]
        peak = max(peak, sum(_pss_kb(p) for p in pids) * 1024)
    api.wait()
    # Each pending writer pins one replaced state (64 MB) plus the interpreter pages it
    # touches (a few MB); six unbounded writers would pin well over 6 states.
    assert peak - baseline <= 5 * size
    assert len(api.list()) == 6


def _gone_within(pid: int, seconds: float) -> bool:
    """True once pid has exited (its writes would take 5 s, so it can only be gone if killed)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


CRASH_SCRIPT = """
import os, sys, numpy as np
sys.path.insert(0, {tests!r})
from test_async import make_api, FaultyFileSystem
FaultyFileSystem.write_delay = 5.0
flow, api = make_api({root!r})
flow.w = np.ones(1 << 21)
FaultyFileSystem.write_delay = 0.0
good = api.save(wait=True)
FaultyFileSystem.write_delay = 5.0
flow.w = np.zeros(1 << 21)
api.save()
print(good.key, api._saver.forked_children[0].pid, flush=True)
os._exit(0)
"""


def test_crash_with_a_pending_save_keeps_the_previous_checkpoint(tmp_path):
    """os._exit with a save in flight: the writer dies with the task, and the previous
    checkpoint is what the next attempt loads."""
    root = f"faultyfile://{tmp_path}/root"
    script = CRASH_SCRIPT.format(tests=str(Path(__file__).parent), root=root)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    good_key, writer_pid = out.split()
    assert _gone_within(int(writer_pid), seconds=3), "the background writer outlived its task"
    flow, later = make_api(root, attempt=1)
    assert [a.key for a in later.list()] == [good_key]
    assert later.load().key == good_key and flow.w.sum() == 1 << 21


ASYNC_FLOW = """
import sys
sys.path.insert(0, {tests!r})
import faults
import numpy as np
from metaflow import FlowSpec, checkpoint, current, step

class AsyncFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.work)

    @checkpoint(root={root!r})
    @step
    def work(self):
        current.checkpoint.save(wait=True)  # the first save checks the root is writable
        faults.FaultyFileSystem.fail_paths = {fail!r}  # then writes fail, if the test says so
        self.w = np.zeros(2_000_000)
        pending = current.checkpoint.save()
        self.w[:] = 1.0  # changed in place while the save is being written
        self.key = pending.key
        self.returned_before_hashing = "hash" not in pending.implicit_manifest["fields"]["w"]
        self.next(self.end)

    @step
    def end(self):
        pass

if __name__ == "__main__":
    AsyncFlow()
"""


def test_step_end_waits_for_background_saves(run_flow, write_flow, tmp_path):
    """A step that never waits still ends with its background save durable, holding the
    values from save() time."""
    from metaflow import Checkpoint, Run

    root = f"faultyfile://{tmp_path}/ck"
    path = write_flow(ASYNC_FLOW.format(tests=str(Path(__file__).parent), fail=(), root=root))
    run = Run(f"AsyncFlow/{run_flow(path, 'run').run_id}")
    task = run["work"].task
    assert task["returned_before_hashing"].data is True and task["w"].data.sum() == 2_000_000
    stored, first = Checkpoint().list(task=task)
    assert stored.key == task["key"].data and first.parent is None and stored.parent == first.key
    assert Checkpoint().load(stored)["w"].sum() == 0.0


def test_background_failure_fails_the_task_naming_the_checkpoint(run_flow, write_flow, tmp_path):
    """A background write that fails makes the task fail at step end, with the checkpoint named."""
    root = f"faultyfile://{tmp_path}/ck"
    path = write_flow(ASYNC_FLOW.format(tests=str(Path(__file__).parent), fail=("/objects/",), root=root))
    result = run_flow(path, "run", expect_ok=False)
    assert "Background save failed in step 'work'" in result.output
    assert "OSError: injected write failure" in result.output


def test_async_saves_off_makes_every_save_durable_on_return(tmp_path):
    """With async_saves=False even a large save is complete when save() returns."""
    flow, api = make_api(str(tmp_path), async_saves=False)
    flow.w = np.arange(4 * MB, dtype=np.float64)
    artifact = api.save()
    assert "body" in artifact.implicit_manifest and artifact.written > artifact.size
    assert api.pending == 0 and [a.key for a in api.list()] == [artifact.key]
