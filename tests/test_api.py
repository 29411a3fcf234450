"""current.checkpoint over a plain object: parent links and what a failed save leaves behind."""
from __future__ import annotations

import threading
import types

import pytest

from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import CheckpointSaveError
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation

LOC = TaskLocation("F", "1", "train", "2")


def test_parent_is_the_last_saved_or_loaded_checkpoint(root_url):
    """Each save's parent is the previous save of the attempt, or what the attempt loaded
    (every save written: batched saves that supersede others are tests/test_incremental.py's)."""
    flow = types.SimpleNamespace(n=1)
    api = standalone(flow, root_url, LOC, async_saves=False)
    first = api.save()
    second = api.save()
    assert first.parent is None and second.parent == first.key
    resumed = standalone(types.SimpleNamespace(), root_url, LOC, attempt=1)
    assert resumed.load().key == second.key
    assert resumed.save().parent == second.key


def test_a_failed_save_is_nobodys_parent(root_url):
    """After a save that failed, the next save descends from the last good one."""
    flow = types.SimpleNamespace(n=1)
    api = standalone(flow, root_url, LOC)
    good = api.save(wait=True)
    flow.lock = threading.Lock()
    with pytest.raises(CheckpointSaveError):
        api.save()
    del flow.lock
    assert api.save().parent == good.key
