"""Transient faults are retried (bounded in time), lasting ones fail naming the URL, and no fault
ever costs an earlier checkpoint. Faults are injected by tests/transient_faults.py around real
backends."""
from __future__ import annotations

import errno
import time

import numpy as np
import pytest
from botocore.exceptions import EndpointConnectionError, NoCredentialsError, SSLError
from transient_faults import TRANSIENT, FaultyFS, answer

from conftest import S3_BUCKET, free_port
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import (
    CheckpointSaveError,
    CheckpointStorageError,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.retry import (
    GaveUp,
    RetryPolicy,
    is_transient,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.storage_options import storage_options
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import CheckpointStore

LOC = TaskLocation("FaultFlow", "3", "train", "7")
FAST = RetryPolicy(deadline=20.0, base=0.001, cap=0.01)


def faulty(root_url, rate=0.0, retry=FAST, **options):
    store = CheckpointStore(root_url, {**storage_options(root_url), **options}, retry=retry)
    store.fs = FaultyFS(store.fs, rate=rate, seed=11)
    return Checkpointer(store)


def state(i):
    return {"i": i, "w": np.random.default_rng(i).normal(size=2000), "const": np.arange(3000)}


def assert_state(values, i):
    expected = state(i)
    assert values["i"] == i and np.array_equal(values["w"], expected["w"])
    assert np.array_equal(values["const"], expected["const"])


@pytest.mark.parametrize("error, transient", [
    (answer(503, "SlowDown"), True),
    (answer(500, "InternalError"), True),
    (answer(429, "TooManyRequests"), True),
    (answer(404, "NoSuchKey"), False),
    (answer(403, "AccessDenied"), False),
    (answer(400, "InvalidArgument"), False),
    (EndpointConnectionError(endpoint_url="http://x"), True),
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (TimeoutError("slow"), True),
    (SSLError(endpoint_url="http://x", error="bad certificate"), False),
    (NoCredentialsError(), False),
    (ValueError("bug"), False),
])
def test_transient_faults_are_told_from_permanent_ones(error, transient):
    """5xx, throttling, resets and timeouts are retried; missing, denied, bad requests are not."""
    assert is_transient(error) is transient


def test_retries_back_off_with_jitter_and_stop_at_the_deadline():
    """Waits grow and vary; no attempt starts after the deadline; the last error is kept."""
    starts = []

    def flaky():
        starts.append(time.monotonic())
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    policy = RetryPolicy(deadline=1.0, base=0.02, cap=0.2)
    with pytest.raises(GaveUp) as caught:
        policy.call(flaky)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert caught.value.attempts == len(starts) >= 5
    assert starts[-1] - starts[0] <= 1.0 + 0.2  # only scheduling delay beyond the deadline
    assert len(set(round(g, 3) for g in gaps)) >= len(gaps) // 2  # jittered, not lockstep
    assert max(gaps) <= 0.2 + 0.1  # no wait beyond the cap (plus scheduling delay)
    assert isinstance(caught.value.last, ConnectionResetError)


def test_permanent_errors_are_not_retried():
    """An access-denied answer is raised at the first attempt."""
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError("AccessDenied")

    with pytest.raises(PermissionError):
        FAST.call(denied)
    assert calls == [1]


def test_saves_and_loads_survive_random_transient_faults(root_url):
    """With 30% of storage calls failing (before or after reaching storage), every save commits,
    every checkpoint restores exactly, and each injected fault was retried once."""
    cp = faulty(root_url, rate=0.3)
    keys = [cp.save(LOC, 0, state(i)).key for i in range(12)]  # a local disk needs few calls
    for i, key in enumerate(keys):
        assert_state(cp.restore(cp.read(key)), i)
    assert [a.key for a in cp.list(LOC)] == keys[::-1]
    assert cp.store.fs.injected >= 10
    assert cp.store.retried == cp.store.fs.injected


def test_a_lost_answer_to_the_manifest_put_still_commits_once(root_url):
    """The manifest landed but its answer was lost: the retry recognizes its own write."""
    cp = faulty(root_url)
    commit = "mv" if root_url.startswith("/") else "pipe_file"
    cp.save(LOC, 0, {"n": 0})  # payload objects exist; the next save writes only its manifest
    cp.store.fs.fail_next(commit, after=True)
    artifact = cp.save(LOC, 0, {"n": 0})
    assert cp.store.fs.injected == 1 and cp.store.retried == 1
    assert [a.key for a in cp.list(LOC)][0] == artifact.key and len(cp.list(LOC)) == 2
    assert cp.restore(cp.read(artifact.key)) == {"n": 0}


def test_a_save_that_keeps_failing_names_the_url_and_keeps_the_previous_checkpoint(root_url):
    """An outage outlasting the retry deadline fails the save with the manifest's URL; the
    earlier checkpoint is still listed and restores exactly."""
    cp = faulty(root_url, retry=RetryPolicy(deadline=0.5, base=0.01, cap=0.05))
    good = cp.save(LOC, 0, state(1))
    cp.store.fs.rate, cp.store.fs.only, cp.store.fs.after = 1.0, {"pipe_file", "mv"}, 0.0
    with pytest.raises(CheckpointStorageError) as caught:
        cp.save(LOC, 0, state(1))  # payloads exist: only the manifest write is attempted
    message = str(caught.value)
    assert f"Could not write manifest {cp.store.fs.unstrip_protocol(cp.store.root)}/FaultFlow/steps/" in message
    assert "still failing after" in message and "Earlier checkpoints are untouched" in message
    cp.store.fs.rate = 0.0
    assert [a.key for a in cp.list(LOC)] == [good.key]
    assert_state(cp.restore(cp.read(good.key)), 1)


def test_a_manifest_is_never_overwritten_on_object_stores(object_store_url):
    """Putting a manifest where one exists with other bytes is refused; the old one is intact."""
    cp = faulty(object_store_url)
    artifact = cp.save(LOC, 0, {"n": 1})
    loc, checkpoint_id = artifact.location, artifact.key.rsplit("/", 1)[1]
    with pytest.raises(CheckpointSaveError, match="already holds another checkpoint; nothing was overwritten"):
        cp.store.put_manifest(loc, checkpoint_id, b'{"forged": true}')
    assert cp.restore(cp.read(artifact.key)) == {"n": 1}


def test_a_missing_bucket_fails_the_first_save_at_once_naming_the_root(s3_server):
    """No retrying a bucket that does not exist: the first save says which root is wrong."""
    root = "s3://no-such-bucket/ckpt"
    cp = faulty(root, retry=RetryPolicy(deadline=30.0))
    with pytest.raises(CheckpointStorageError, match="Cannot write checkpoints under s3://no-such-bucket/ckpt"):
        cp.save(LOC, 0, {"n": 1})
    assert cp.store.retried == 0


def test_an_unreachable_endpoint_fails_the_first_save_naming_the_root(s3_server):
    """Nothing listens on the endpoint: connection errors are retried, then the first save fails
    naming the root and the endpoint setting to check."""
    root = f"s3://{S3_BUCKET}/ckpt"
    dead = f"http://127.0.0.1:{free_port()}"
    cp = faulty(root, retry=RetryPolicy(deadline=1.0, base=0.05), client_kwargs={"endpoint_url": dead})
    with pytest.raises(CheckpointStorageError) as caught:
        cp.save(LOC, 0, {"n": 1})
    assert f"Cannot write checkpoints under {root}" in str(caught.value)
    assert "METAFLOW_S3_ENDPOINT_URL" in str(caught.value)
    assert "still failing after" in str(caught.value)  # a connection error is retried, then given up


def test_a_local_root_that_cannot_be_created_fails_the_first_save(tmp_path):
    """A root below a regular file cannot hold checkpoints: the first save names it."""
    (tmp_path / "file").write_text("not a folder")
    root = str(tmp_path / "file" / "ckpt")
    with pytest.raises(CheckpointStorageError, match=f"Cannot write checkpoints under {root}"):
        faulty(root).save(LOC, 0, {"n": 1})


def test_every_injected_fault_kind_is_retried():
    """Each kind of transient error the wrapper raises is classified as transient."""
    assert all(is_transient(make()) for make in TRANSIENT)
