"""What sits in a local root is not trusted: a FIFO or a link leading out of the root, named like
a manifest or a payload, is refused at once, never read and never waited on (localfs.py).

Each scenario runs in a child process with a time limit, so a read that blocks fails the test
instead of hanging it.
"""
from __future__ import annotations

import os
import subprocess
import sys

SCENARIO = """
import os, sys, types, warnings
import numpy as np
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint import gc
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import CheckpointError
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.recovery import restore_newest_intact
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import CheckpointStore

root, kind, target = sys.argv[1], sys.argv[2], sys.argv[3]
loc = TaskLocation("F", "1", "train", "1")
flow = types.SimpleNamespace(w=np.arange(10_000.0))
api = standalone(flow, root, loc, async_saves=False)
good = api.save()
flow.w = flow.w + 1
bad = api.save()
store = api._checkpointer.store
if target == "manifest":
    path = os.path.join(store.task_path(loc), bad.key.rsplit("/", 1)[1] + ".json")
else:
    own = bad.payload_digests() - good.payload_digests()  # the payloads only the newer one has
    path = [os.path.join(d, f) for d, _, fs in os.walk(store.flow_path("F")) for f in fs
            if "/objects/" in d and f in own][0]
os.unlink(path)
if kind == "fifo":
    os.mkfifo(path)
else:
    outside = os.path.join(os.path.dirname(root), "outside")
    with open(outside, "wb") as f:
        f.write(b"secret")
    os.symlink(outside, path)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cp = Checkpointer(CheckpointStore(root))
    listed = [a.key for a in cp.list(loc)]
    found = restore_newest_intact(cp, cp.resumable(loc, 1, other_runs=False, namespace=None))
    assert found is not None and found[0].key == good.key, found
    try:
        cp.load(bad.key)
        raise SystemExit("an explicit load of the damaged checkpoint did not raise")
    except CheckpointError as exc:
        print("explicit:", exc)
    try:
        gc.collect(CheckpointStore(root), "F", grace=0)
    except CheckpointError as exc:
        print("gc:", exc)
print("warned:", " | ".join(str(w.message) for w in caught))
print("listed:", listed)
"""


def run(tmp_path, kind: str, target: str) -> str:
    proc = subprocess.run([sys.executable, "-c", SCENARIO, str(tmp_path / "ckpt"), kind, target],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_a_fifo_named_like_a_manifest_never_blocks_and_is_skipped(tmp_path):
    """list(), the default resume and gc go on without it; loading it by key raises naming it."""
    out = run(tmp_path, "fifo", "manifest")
    assert "is a FIFO, not a checkpoint file" in out


def test_a_fifo_named_like_a_payload_never_blocks_and_the_resume_falls_back(tmp_path):
    """The default resume warns and falls back to the older intact checkpoint."""
    out = run(tmp_path, "fifo", "payload")
    assert "is a FIFO, not a checkpoint file" in out and "Not resuming from damaged checkpoint" in out


def test_a_link_leading_out_of_the_root_is_refused(tmp_path):
    """A payload that is a symbolic link to a file outside the root is refused, not read."""
    out = run(tmp_path, "link", "payload")
    assert "outside the checkpoint root" in out
