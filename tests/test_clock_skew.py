"""No clock decides what is newest: real runs whose attempts see clocks set back by 10 minutes.

libfaketime (the Debian package ``faketime``) shifts the wall clock of the whole run. The step
moves it back between attempts, as when a retry lands on a machine whose clock is behind.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from metaflow import Checkpoint, Run, Task

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")

SKEWED = """
from pathlib import Path
from metaflow import FlowSpec, checkpoint, current, retry, step

class SkewFlow(FlowSpec):
    @retry(times=2, minutes_between_retries=0)
    @checkpoint(keep={"last": 2})
    @step
    def start(self):
        self.epoch = 0
        current.checkpoint.load()
        for _ in range(5):
            self.epoch += 1
            current.checkpoint.save(metadata={"epoch": self.epoch}, wait=True)  # each epoch written
        if current.retry_count < 2:
            # The next attempt runs 10 (then 20) minutes behind this one.
            Path(CLOCK).write_text(f"-{10 * (current.retry_count + 1)}m")
            raise RuntimeError("crash after five epochs")
        self.next(self.end)

    @step
    def end(self):
        pass

if __name__ == "__main__":
    SkewFlow()
"""


@pytest.fixture
def faketime_env(tmp_path):
    if not LIBFAKETIME.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("libfaketime is missing: .ci/run installs the Debian package faketime")
        pytest.skip("libfaketime is not installed (apt-get install faketime)")
    clock = tmp_path / "clock"
    clock.write_text("+0")
    # Each process reads the file once, when it starts (so its own clock never jumps): an
    # attempt started after the step rewrote it runs with the new offset.
    env = {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME_TIMESTAMP_FILE": str(clock),
           "FAKETIME_CACHE_DURATION": "1000000",
           "METAFLOW_IMPLICIT_CHECKPOINT_ROOT": str(tmp_path / "ckpt")}
    return clock, env


def test_attempts_with_clocks_set_back_resume_from_the_truly_newest_and_retention_keeps_it(
    run_flow, write_flow, faketime_env
):
    """Three attempts of five epochs each, the 2nd 10 and the 3rd 20 minutes behind the 1st:
    each resumes where the previous one stopped (15 epochs in all, not 10), list() is newest
    first by attempt, and keep={"last": 2} keeps the newest saves, not the 1st attempt's."""
    clock, env = faketime_env
    flow = write_flow(SKEWED.replace("CLOCK", repr(str(clock))), "skew_flow.py")
    run = Run(f"SkewFlow/{run_flow(flow, 'run', env=env).run_id}")
    # Metaflow's own client orders attempts by their clocks too: name the attempt.
    task = Task(run["start"].task.pathspec, attempt=2)
    assert task.data.epoch == 15
    listed = Checkpoint().list(task=task)
    assert [c.metadata["epoch"] for c in listed][:2] == [15, 14]
    assert [c.attempt for c in listed][:2] == [2, 2]
    assert min(c.created_on for c in listed[:2]) < max(c.created_on for c in listed)  # the clock was behind


def test_the_skew_test_needs_faketime_in_ci():
    """CI installs libfaketime (.ci/run): there the skew test never skips."""
    if os.environ.get("CI") == "true":
        assert LIBFAKETIME.exists() or shutil.which("faketime")
