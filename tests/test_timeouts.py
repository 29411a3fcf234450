"""No storage call hangs: an S3 endpoint that accepts connections and never answers fails a save
within the retry deadline plus one call's time limit, naming the URL."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from conftest import S3_BUCKET

SAVE = """
import types
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation

api = standalone(types.SimpleNamespace(n=1), ROOT, TaskLocation("F", "1", "s", "1"), async_saves=False)
api.save()
"""


def test_a_black_hole_endpoint_fails_the_save_within_the_bound_naming_the_url():
    """RETRY_SECONDS=2 and an endpoint on 127.0.0.1 that takes connections but never answers:
    the save fails in well under a minute (the bound is 2 s plus one 30 s call limit), naming
    the root, instead of waiting forever."""
    root = f"s3://{S3_BUCKET}/black-hole"
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # the kernel completes handshakes; nothing ever reads or answers
        env = {**os.environ, "METAFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{hole.getsockname()[1]}",
               "METAFLOW_IMPLICIT_CHECKPOINT_RETRY_SECONDS": "2", "USERNAME": "tester"}
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", SAVE.replace("ROOT", repr(root))], env=env,
                              capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
    assert proc.returncode != 0
    assert f"Cannot write checkpoints under {root}" in proc.stderr
    assert "no answer within 30 s" in proc.stderr
    assert took < 90  # generous: an upper bound, not a timing
