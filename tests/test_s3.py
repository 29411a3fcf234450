"""Whole flows with `--datastore s3 --metadata local` against a real S3 API server (moto's, on
loopback), configured only through Metaflow's own S3 settings (see conftest.S3_ENV)."""
from __future__ import annotations

import numpy as np
import pytest
from metaflow import Checkpoint, Run

from conftest import FLOWS, S3_BUCKET, TEST_FLOWS, free_port, assert_demo_checkpoints

S3_RUN = ("--datastore", "s3", "--metadata", "local", "run")
ROOT = f"s3://{S3_BUCKET}/metaflow/mf.implicit_checkpoints"


@pytest.fixture(scope="module")
def run_s3(run_flow, s3_server):
    return run_flow


def test_training_on_s3_survives_two_sigkills_with_the_uninterrupted_weights(run_s3):
    """Checkpoints land beside Metaflow's S3 artifacts with no extra setup; three attempts end
    with exactly the weights of a run without crashes."""
    crashed = run_s3(FLOWS / "train_numpy.py", *S3_RUN)
    clean = run_s3(FLOWS / "train_numpy.py", *S3_RUN, "--crash-at", "")
    a, b = Run(f"TrainFlow/{crashed.run_id}"), Run(f"TrainFlow/{clean.run_id}")
    assert np.array_equal(a.data.w, b.data.w) and a.data.losses == b.data.losses
    task = a["train"].task
    checkpoints = Checkpoint().list(task=task)
    assert_demo_checkpoints(checkpoints)
    assert all(c.url.startswith(f"{ROOT}/TrainFlow/steps/train/root/{crashed.run_id}/") for c in checkpoints)
    assert task.metadata_dict["implicit-checkpoint-root"] == ROOT
    assert np.array_equal(Checkpoint().load(checkpoints[0])["w"], a.data.w)


def test_eight_foreach_branches_on_one_s3_root_lose_nothing_and_never_mix(run_s3):
    """Eight concurrent writers (four of them killed and resumed) keep every checkpoint, each
    holding only its own branch's state; the payload they all wrote is stored once."""
    run = Run(f"Fanout8Flow/{run_s3(TEST_FLOWS / 'fanout8_flow.py', *S3_RUN).run_id}")
    shared_hashes = set()
    for task in run["work"]:
        shard = task["shard"].data
        checkpoints = Checkpoint().list(task=task)
        assert [(c.metadata["shard"], c.metadata["i"]) for c in checkpoints] == [(shard, i) for i in range(6, 0, -1)]
        assert [c.attempt for c in checkpoints] == ([1] * 3 + [0] * 3 if shard % 2 else [0] * 6)
        for c in checkpoints:
            values = Checkpoint().load(c)
            i = c.metadata["i"]
            assert values["shard"] == shard and values["i"] == i
            assert np.array_equal(values["w"], np.full(1000, shard * 100.0 + i))
            assert [t[:2] for t in values["trail"]] == [[shard, k] for k in range(1, i + 1)]
            shared_hashes.add(tuple(c.field_payloads("shared")))  # its chunks
    assert len(shared_hashes) == 1
    assert {s: [t[:2] for t in trail] for s, trail in run.data.trails.items()} == {
        s: [[s, k] for k in range(1, 7)] for s in range(8)
    }


UNREACHABLE = """
from metaflow import FlowSpec, checkpoint, current, step

class DeadRootFlow(FlowSpec):
    @checkpoint
    @step
    def start(self):
        self.n = 1
        current.checkpoint.save()  # the first save
        self.next(self.end)

    @step
    def end(self):
        pass

if __name__ == "__main__":
    DeadRootFlow()
"""


def test_an_unreachable_s3_root_fails_at_the_first_save_naming_it(run_flow, write_flow):
    """Nothing listens at the S3 endpoint: the first save fails in the step's own code, naming
    the root and the setting to check, after retrying for the configured time."""
    dead = {"METAFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
            "METAFLOW_IMPLICIT_CHECKPOINT_ROOT": f"s3://{S3_BUCKET}/unreachable",
            "METAFLOW_IMPLICIT_CHECKPOINT_RETRY_SECONDS": "1"}
    result = run_flow(write_flow(UNREACHABLE), "run", env=dead, expect_ok=False)
    line = next(n for n, text in enumerate(UNREACHABLE.split("\n"), 1) if "# the first save" in text)
    assert f"Checkpoint storage failed in file {result.flow_file} on line {line}:" in result.output  # Metaflow's format
    assert f"Cannot write checkpoints under s3://{S3_BUCKET}/unreachable" in result.output
    assert "still failing after" in result.output and "METAFLOW_S3_ENDPOINT_URL" in result.output
    assert "Internal error" not in result.output and "Traceback" not in result.output
