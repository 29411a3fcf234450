"""End-to-end: the example flows in flows/ and the API flow in tests/flows/, run for real."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from metaflow import Checkpoint, Flow, Run, Task

from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import CheckpointCorrupt

from conftest import FLOWS, TEST_FLOWS, assert_demo_checkpoints


def test_extension_is_importable_and_in_the_banner():
    """`from metaflow import checkpoint, Checkpoint` works and the version string names us."""
    code = (
        "from metaflow import checkpoint, Checkpoint, CheckpointArtifact\n"
        "from metaflow.metaflow_version import get_version\n"
        "print(get_version())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "implicit-checkpoint(" in out


def test_training_resumes_to_exactly_the_uninterrupted_result(run_flow):
    """Two SIGKILLs mid-training, three attempts, and the same weights as a run without crashes."""
    crashed = run_flow(FLOWS / "train_numpy.py", "run")
    clean = run_flow(FLOWS / "train_numpy.py", "run", "--crash-at", "")
    a, b = Run(f"TrainFlow/{crashed.run_id}"), Run(f"TrainFlow/{clean.run_id}")
    assert np.array_equal(a.data.w, b.data.w) and a.data.losses == b.data.losses
    task = a["train"].task
    assert task.current_attempt == 2
    assert_demo_checkpoints(Checkpoint().list(task=task))  # each attempt saved only its new epochs
    # The demo proves its point itself, and says where to look next.
    assert "same weights as an uninterrupted run, bit for bit" in crashed.output
    assert f"Checkpoint().list(task={task.pathspec!r})" in crashed.output


def test_foreach_branches_checkpoint_independently(run_flow):
    """Each branch resumes from its own checkpoints; only the crashed branch resumes; the join's
    merge_artifacts is not disturbed by the decorator."""
    result = run_flow(FLOWS / "foreach_fanout.py", "run")
    run = Run(f"FanoutFlow/{result.run_id}")
    expected = {s: sum(i * i for i in range(s * 1000, s * 1000 + 1000)) for s in range(4)}
    assert run.data.totals == expected
    assert run.data.resumed == {0: None, 1: None, 2: 5, 3: None}
    for task in run["work"]:
        shard = task["shard"].data
        checkpoints = Checkpoint().list(task=task)
        attempts = [c.attempt for c in checkpoints]  # chunks take microseconds: saves are batched
        assert attempts == sorted(attempts, reverse=True) and set(attempts) == ({0, 1} if shard == 2 else {0})
        assert checkpoints[0].metadata["chunk"] == 10
        if shard == 2:
            assert [c.metadata["chunk"] for c in checkpoints if c.attempt == 0][0] == 5
        assert {c.key.split("/")[4] for c in checkpoints} == {str(shard)}  # its foreach position
        assert Checkpoint().load(checkpoints[0])["shard"] == shard


def test_eager_resume_continues_from_the_failed_run(run_flow):
    """A failed run, then `resume`: the new task starts where the failed one stopped."""
    failed = run_flow(FLOWS / "resume_eager.py", "run", env={"FAIL_AT": "12"}, expect_ok=False)
    assert "service unavailable at item 12" in failed.output
    resumed = run_flow(FLOWS / "resume_eager.py", "resume")
    run = Run(f"ResumeFlow/{resumed.run_id}")
    assert run.data.started_at == 12 and run.data.loaded_from.startswith(f"ResumeFlow/{failed.run_id}/")
    assert run.data.results == {i: f"summary-{i}-{i * i % 97}" for i in range(20)}
    task = run["process"].task
    loaded = task.metadata_dict["implicit-checkpoint-loaded"]
    assert loaded.startswith(f"ResumeFlow/{failed.run_id}/process/")
    chain = Checkpoint().lineage(Checkpoint().list(task=task)[0])
    runs = [c.pathspec.split("/")[1] for c in chain]  # items take microseconds: saves are batched
    assert runs == sorted(runs, key=[failed.run_id, resumed.run_id].index) and set(runs) == {failed.run_id, resumed.run_id}


FRESH_FLOW = """
import os
from metaflow import FlowSpec, checkpoint, current, step

class FreshFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.work)

    @checkpoint
    @step
    def work(self):
        self.found = current.checkpoint.is_loaded
        self.n = 1
        current.checkpoint.save()
        if os.environ.get("FAIL"):
            raise RuntimeError("fail")
        self.next(self.end)

    @step
    def end(self):
        pass

if __name__ == "__main__":
    FreshFlow()
"""


def test_fresh_never_loads_another_runs_checkpoint(run_flow, write_flow):
    """With the default policy, `resume` after a failed run finds nothing to load."""
    path = write_flow(FRESH_FLOW)
    run_flow(path, "run", env={"FAIL": "1"}, expect_ok=False)
    resumed = run_flow(path, "resume")
    assert Run(f"FreshFlow/{resumed.run_id}").data.found is False


@pytest.fixture(scope="module")
def api_run(run_flow):
    return Run(f"ApiFlow/{run_flow(TEST_FLOWS / 'api_flow.py', 'run').run_id}")


def test_every_attribute_type_survives_two_crashes(api_run):
    """ints, floats, None, tuples, sets, float32 arrays, RNG state, lambdas, closures, local
    classes and an upstream artifact changed in place all come back after crashes."""
    task = api_run["types"].task
    assert task["restored"].data == {
        "n": 107, "x": 2.5, "s": "text", "none": None, "tup": (1, "a"), "st": [3, 4],
        "arr": np.arange(12.0).reshape(3, 4).tolist(), "arr_dtype": "float32", "draw_matches": True,
        "fn": 6, "counter": 12, "obj": 8, "cls": 5, "upstream": {"seen": ["attempt0"]},
        "has_untouched": False,
    }
    assert task["is_loaded_seen"].data is True
    assert api_run["start"].task["undecorated_has_checkpoint"].data is False


def test_list_is_time_ordered_across_attempts_with_filters(api_run):
    """list() spans all attempts newest first; attempt= and name= filter."""
    task = api_run["types"].task
    listing = task["listing"].data
    assert [(a, n) for a, n, _, _ in listing] == [(1, "special"), (0, "second"), (0, "first")]
    assert [c for _, _, c, _ in listing] == sorted((c for _, _, c, _ in listing), reverse=True)
    assert task["listing_attempt0"].data == ["second", "first"]
    assert task["listing_special"].data == [1]


def test_lineage_across_three_attempts(api_run):
    """Attempt 2 loaded attempt 1's checkpoint, which descends from attempt 0's `latest` one;
    `second` (latest=False) was never picked."""
    task = api_run["types"].task
    assert task["chain"].data == [(0, "first"), (1, "special")]
    assert task.metadata_dict["implicit-checkpoint-loaded"] == task["loaded_key"].data


def test_inspect_is_the_same_for_every_kind_of_reference(api_run):
    """inspect(artifact) == inspect(to_dict()) == inspect(key) == artifact.implicit_manifest."""
    task = api_run["types"].task
    assert task["inspect_same"].data is True
    fields = task["inspected"].data["fields"]
    assert fields["arr"]["type"] == "numpy.ndarray" and fields["rng"]["type"].endswith("Generator")
    assert "untouched" not in fields and "name" not in fields


def test_include_saves_only_the_named_attributes(api_run):
    """@checkpoint(include=[...]) restores the included attributes and nothing else."""
    assert api_run["filters"].task["filters_restored"].data == ["kept", "lock_free"]


def test_client_outside_a_task(api_run):
    """Checkpoint() lists, loads (as a dict or into an object), inspects and follows lineage."""
    task = api_run["types"].task
    all_cps = Checkpoint().list(task=task)
    assert [c.name for c in all_cps] == ["special", "second", "first"]
    assert Checkpoint().list(task=task.pathspec) == all_cps
    assert [c.name for c in Checkpoint().list(task=task, attempt=0)] == ["second", "first"]
    assert [c.attempt for c in Checkpoint().list(task=task, name="first")] == [0]
    values = Checkpoint().load(all_cps[0].key)
    assert values["n"] == 107 and values["fn"](2) == 6

    class Target:
        pass

    target = Target()
    Checkpoint().load(all_cps[-1].to_dict(), into=target)
    assert target.n == 7 and target.arr.dtype == np.float32
    assert Checkpoint().inspect(all_cps[0]) == all_cps[0].implicit_manifest
    assert [c.name for c in Checkpoint().lineage(all_cps[0])] == ["first", "special"]
    assert Checkpoint().list(task=api_run["start"].task) == []


def test_inspect_survives_deleted_payloads(run_flow, tmp_path):
    """With every payload deleted, inspect() still answers and load() names the missing field.
    (The storage root comes from METAFLOW_IMPLICIT_CHECKPOINT_ROOT and is found again through
    task metadata.)"""
    root = tmp_path / "elsewhere"
    result = run_flow(TEST_FLOWS / "api_flow.py", "run", env={"METAFLOW_IMPLICIT_CHECKPOINT_ROOT": str(root)})
    task = Run(f"ApiFlow/{result.run_id}")["types"].task
    newest = Checkpoint().list(task=task)[0]
    assert newest.url.startswith(f"file://{root}/ApiFlow/")
    shutil.rmtree(root / "ApiFlow" / "objects")
    assert Checkpoint().inspect(newest.key)["fields"]["n"]["type"] == "int"
    with pytest.raises(CheckpointCorrupt, match=f"Field 'big' of checkpoint {newest.key} is missing"):
        Checkpoint().load(newest.key)


WITH_FLOW = """
from metaflow import FlowSpec, current, step

class WithFlow(FlowSpec):
    @step
    def start(self):
        self.n = 5
        self.saved = "checkpoint" in current and current.checkpoint.save().key
        self.next(self.end)

    @step
    def end(self):
        pass

if __name__ == "__main__":
    WithFlow()
"""


def test_checkpoint_attached_from_the_command_line(run_flow, write_flow):
    """`run --with checkpoint:card=False,async_saves=False` attaches the decorator to every step,
    its options given as strings."""
    path = write_flow(WITH_FLOW, "with_flow.py")
    result = run_flow(path, "run", "--with", "checkpoint:card=False,async_saves=False")
    task = Run(f"WithFlow/{result.run_id}")["start"].task
    (saved,) = Checkpoint().list(task=task)
    assert saved.key == task["saved"].data and Checkpoint().load(saved) == {"n": 5}
