"""Step-indexed checkpoints: save(step=N), load(step=N), list(step=N), in the core, the client,
the CLI and the card."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
from metaflow import Checkpoint, Run

from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import (
    CheckpointCorrupt,
    CheckpointNotFound,
    CheckpointSaveError,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation, read_manifest
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.steps import find_step
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import open_store

from conftest import TEST_FLOWS, CardTables
from test_card import card_html

LOC = TaskLocation("F", "1", "train", "2")


def test_load_by_step_restores_the_newest_save_of_that_step(root_url):
    """Two saves of step 3 and one of step 4: load(step=3) restores the newer step 3, in a later
    attempt too, and list(step=3) lists exactly the two."""
    flow = types.SimpleNamespace(w=0)
    api = standalone(flow, root_url, LOC)
    for w, step in [(1, 3), (2, 3), (3, 4)]:
        flow.w = w
        api.save(step=step, wait=True)  # two saves of step 3: written, not batched into one
    retry = standalone(types.SimpleNamespace(), root_url, LOC, attempt=1)
    assert retry.load(step=3).step == 3 and retry._ctx.flow.w == 2
    assert [a.step for a in retry.list(step=3)] == [3, 3] and retry.list(step=5) == []
    assert [a.step for a in retry.list()] == [4, 3, 3]
    assert retry.load().step == 4  # the default load is unchanged by steps


def test_step_is_validated_before_anything_is_written(root_url):
    """A step that is not a whole number >= 0 is refused naming it; numpy integers are fine."""
    flow = types.SimpleNamespace(w=1)
    api = standalone(flow, root_url, LOC)
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(CheckpointSaveError, match=r"save\(step=.*whole number >= 0"):
            api.save(step=bad)
    assert api.list() == []
    assert api.save(step=np.int64(7), wait=True).step == 7 and type(api.list()[0].step) is int


def test_a_missing_step_names_the_steps_that_exist(root_url):
    """load(step=N) with no such save raises CheckpointNotFound naming N and the saved steps;
    without any step saved it says how to save one."""
    flow = types.SimpleNamespace(w=1)
    api = standalone(flow, root_url, LOC)
    api.save()
    with pytest.raises(CheckpointNotFound, match="none of its checkpoints has a step"):
        api.load(step=1)
    for step in (0, 10, 20):
        api.save(step=step)
    with pytest.raises(CheckpointNotFound, match=r"No checkpoint with step 7 in step 'train'.*steps saved are 0, 10, 20\."):
        api.load(step=7)


def test_manifests_without_a_step_read_as_none_and_a_bad_step_is_damage(tmp_path):
    """A manifest written before steps existed has no `step` key and reads as step None; one whose
    step is not a whole number >= 0 is malformed."""
    root = str(tmp_path / "ckpt")
    saved = standalone(types.SimpleNamespace(w=1), root, LOC).save(step=5, wait=True)
    store = open_store(root)
    data = open(saved.url.removeprefix("file://"), "rb").read()
    for value, expected in [(None, None), ("five", CheckpointCorrupt), (-2, CheckpointCorrupt)]:
        head = json.loads(data.split(b"\n")[0])
        head.pop("step") if value is None else head.update(step=value)
        sealed = json.dumps(head, sort_keys=True).encode() + b"\n" + data.split(b"\n")[1]
        forged = sealed + b"\n" + json.dumps(store.sealer.seal(sealed)).encode()
        if expected is None:
            assert read_manifest(forged, saved.url, store.sealer, saved.key).step is None
        else:
            with pytest.raises(expected, match="bad step"):
                read_manifest(forged, saved.url, store.sealer, saved.key)


def test_eager_finds_a_step_in_other_runs_of_the_namespace(tmp_path):
    """With other runs (load_policy="eager"), a step this task lacks is found in another run
    of the same position and namespace, never in another namespace."""
    root = str(tmp_path / "ckpt")
    for run, namespace, w in [("1", "user:a", 1), ("2", "user:b", 2)]:
        api = standalone(types.SimpleNamespace(w=w), root, TaskLocation("F", run, "train", "9"))
        api._ctx.namespace = namespace
        api.save(step=40, wait=True)
    checkpointer, here = Checkpointer(open_store(root)), TaskLocation("F", "3", "train", "5")
    found = find_step(checkpointer, here, 40, other_runs=True, namespace="user:a", where="step 'train'")
    assert found.pathspec == "F/1/train/9"
    with pytest.raises(CheckpointNotFound, match="or in other runs at its position"):
        find_step(checkpointer, here, 40, other_runs=True, namespace="user:c", where="step 'train'")
    with pytest.raises(CheckpointNotFound):
        find_step(checkpointer, here, 40, other_runs=False, namespace="user:a", where="step 'train'")


@pytest.fixture(scope="module")
def steps_run(run_flow):
    result = run_flow(TEST_FLOWS / "steps_flow.py", "run")
    return result, Run(f"StepsFlow/{result.run_id}")


def test_a_retry_goes_back_to_a_step_by_number(steps_run):
    """Attempt 0 saves steps 0-4 and crashes; attempt 1 resumes at step 4, then load(step=1)
    restores epoch 1's state; load(step=99) names the steps that exist."""
    _, run = steps_run
    data = run["train"].task.data
    assert data.resumed_at == 4 and data.epoch_at_step_1 == 1 and data.w_at_step_1 == [2.0, 2.0, 2.0]
    assert "No checkpoint with step 99" in data.missing and "the steps saved are 0, 1, 2, 3, 4." in data.missing
    assert data.listed == [2]


def test_client_cli_and_card_show_steps(steps_run, run_flow):
    """Checkpoint().list/load by step, `checkpoint list --step` with a STEP column, and the
    card's Step column."""
    result, run = steps_run
    task = run["train"].task
    assert [a.step for a in Checkpoint().list(task=task, step=3)] == [3]
    assert Checkpoint().load(task=task.pathspec, step=2)["epoch"] == 2
    with pytest.raises(CheckpointNotFound, match="step 8 in task"):
        Checkpoint().load(task=task, step=8)
    out = run_flow(TEST_FLOWS / "steps_flow.py", "checkpoint", "list", f"{result.run_id}/train", "--step", "2").proc.stdout
    header, *rows = out.strip().splitlines()
    assert header.split()[:3] == ["KEY", "ATTEMPT", "STEP"] and len(rows) == 1 and rows[0].split()[1:3] == ["0", "2"]
    html = card_html(run_flow, TEST_FLOWS / "steps_flow.py", f"{result.run_id}/train")
    assert [r["cells"][10] for r in CardTables(html).rows("checkpoints")] == ["0", "1", "2", "3", "4"]
