"""Azure Blob (Azurite) and GCS (fake-gcs-server) as checkpoint storage, reached only through
Metaflow's own settings (see emulators.py): one backend-agnostic set run against both, and whole
flows with `--datastore azure` and `--datastore gs`."""
from __future__ import annotations

import re
import uuid

import numpy as np
import pytest
from metaflow import Checkpoint, Run

from conftest import FLOWS, assert_demo_checkpoints
from emulators import BUCKET, _free_port
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint import gc, marks
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.decorator import storage_root
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import CheckpointSaveError
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.storage_options import datastore_url
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import EMPTY_DIGEST, open_store

LOC = TaskLocation("TrainFlow", "17", "train", "4")
# backend -> (Metaflow's --datastore, the fixture starting its emulator, the URL scheme)
BACKENDS = {"azure": ("azure", "azurite", "abfs"), "gcs": ("gs", "gcs_server", "gs")}
ROOTS = {
    "azure": f"abfs://{BUCKET}/metaflow/mf.implicit_checkpoints",
    "gcs": f"gs://{BUCKET}/metaflow/mf.implicit_checkpoints",
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request):
    request.getfixturevalue(BACKENDS[request.param][1])
    return request.param


@pytest.fixture
def cp(backend):
    """A checkpointer on a fresh root in the emulator, opened as a task opens its store."""
    return Checkpointer(open_store(f"{BACKENDS[backend][2]}://{BUCKET}/ckpt-{uuid.uuid4().hex}"))


def payloads(cp) -> set[str]:
    return {p.rsplit("/", 1)[1] for p in cp.store.fs.find(cp.store.root) if "/objects/" in p} - {EMPTY_DIGEST}


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_the_default_root_is_beside_metaflows_datastore(name):
    """With no root= the checkpoints go under Metaflow's datastore root for that datastore
    (Azure's root is written `container/prefix`, without a scheme)."""
    from metaflow.plugins import DATASTORES

    datastore = next(d for d in DATASTORES if d.TYPE == BACKENDS[name][0])
    configured = datastore.get_datastore_root_from_config(lambda *a, **k: None)
    assert storage_root(None, datastore_url(datastore.TYPE, configured)) == ROOTS[name]


@pytest.mark.parametrize("endpoint, account, host", [
    ("https://acct.blob.core.windows.net/", "acct", "acct.blob.core.windows.net"),
    ("https://127.0.0.1:10000/devstoreaccount1", "devstoreaccount1", "127.0.0.1:10000/devstoreaccount1"),
])
def test_azure_options_come_from_metaflows_endpoint_and_credential_provider(monkeypatch, endpoint, account, host):
    """Metaflow's blob endpoint names the account (in the host, or in the path for an emulator)
    and Metaflow's client provider makes the credential; adlfs's own connection string, if
    set, is left to adlfs."""
    from metaflow import metaflow_config

    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.storage_options import storage_options

    monkeypatch.setattr(metaflow_config, "AZURE_STORAGE_BLOB_SERVICE_ENDPOINT", endpoint)
    options = storage_options("az://container/prefix")
    assert (options["account_name"], options["account_host"]) == (account, host)
    assert type(options["credential"]).__name__ == "AzuriteToken"  # the configured provider's
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "UseDevelopmentStorage=true")
    assert "credential" not in storage_options("abfs://container/prefix")


def test_save_list_and_load_round_trip(cp):
    """Saves are listed newest first and load back equal, arrays included; an unchanged array
    is not written again."""
    first = cp.save(LOC, 0, {"epoch": 1, "w": np.arange(50_000.0)}, metadata={"loss": 0.5})
    stored = payloads(cp)
    second = cp.save(LOC, 1, {"epoch": 2, "w": np.arange(50_000.0)}, metadata={"loss": 0.25})
    assert [a.key for a in cp.list(LOC)] == [second.key, first.key]
    assert payloads(cp) == stored and len(stored) == 1
    back = cp.restore(cp.read(first.key))
    assert back["epoch"] == 1 and cp.read(second.key).metadata == {"loss": 0.25}
    np.testing.assert_array_equal(back["w"], np.arange(50_000.0))


def test_the_emulator_refuses_a_conditional_overwrite(cp):
    """The storage itself honours the create-only condition (Azure: If-None-Match: *; GCS:
    ifGenerationMatch=0), so the commit below does not depend on our own check."""
    path = f"{cp.store.root}/probe"
    cp.store.fs.pipe_file(path, b"first", mode="create")
    with pytest.raises(FileExistsError):
        cp.store.fs.pipe_file(path, b"second", mode="create")
    assert cp.store.fs.cat_file(path) == b"first"


def test_a_committed_manifest_is_never_overwritten(cp):
    """A manifest is put create-only: a second commit to the same id is refused and the stored
    checkpoint is untouched; a retry carrying the same bytes is taken as its own put."""
    artifact = cp.save(LOC, 0, {"w": np.ones(1000)})
    checkpoint_id = artifact.key.rsplit("/", 1)[1]
    stored = cp.store.get_manifest(LOC, checkpoint_id)
    assert cp.store.put_manifest(LOC, checkpoint_id, stored) == artifact.url
    with pytest.raises(CheckpointSaveError, match="already holds another checkpoint; nothing was overwritten"):
        cp.store.put_manifest(LOC, checkpoint_id, stored.replace(b"\"w\"", b"\"v\""))
    assert cp.store.get_manifest(LOC, checkpoint_id) == stored
    np.testing.assert_array_equal(cp.restore(artifact)["w"], np.ones(1000))


def test_gc_frees_only_what_no_remaining_checkpoint_references(cp):
    """Deleting a checkpoint and running gc (grace 0) purges its manifest and frees the payload
    only it referenced; the payload a kept checkpoint shares survives and still loads."""
    shared, own = np.full(2000, 7.0), np.full(2000, 3.0)
    doomed = cp.save(LOC, 0, {"shared": shared, "own": own})
    kept = cp.save(LOC, 0, {"shared": shared})
    assert len(payloads(cp)) == 2
    assert marks.retire(cp.store, doomed.key)
    report = gc.collect(cp.store, LOC.flow, grace=0)
    assert (report.purged, report.freed_payloads, report.checkpoints) == (1, 1, 1)
    assert [a.key for a in cp.list(LOC)] == [kept.key] and len(payloads(cp)) == 1
    np.testing.assert_array_equal(cp.restore(kept)["shared"], shared)


@pytest.fixture(scope="module")
def run_on(run_flow):
    return run_flow


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_training_survives_two_sigkills_with_checkpoints_beside_the_datastore(run_on, name, request):
    """A real run with `--datastore azure` / `--datastore gs` (artifacts in the emulator): the
    train step is SIGKILLed twice, @retry resumes from the checkpoints stored beside the
    datastore, and the flow's end step checks the weights equal an uninterrupted run's."""
    datastore, fixture, _ = BACKENDS[name]
    request.getfixturevalue(fixture)
    result = run_on(FLOWS / "train_numpy.py", "--datastore", datastore, "--metadata", "local", "run")
    assert "attempt 1: resumed at epoch 8" in result.output and "bit for bit" in result.output
    run = Run(f"TrainFlow/{result.run_id}")
    task = run["train"].task
    checkpoints = Checkpoint().list(task=task)
    assert_demo_checkpoints(checkpoints)
    assert all(c.url.startswith(f"{ROOTS[name]}/TrainFlow/steps/train/root/{result.run_id}/") for c in checkpoints)
    assert task.metadata_dict["implicit-checkpoint-root"] == ROOTS[name]
    np.testing.assert_array_equal(Checkpoint().load(checkpoints[0])["w"], run.data.w)
    # The `checkpoint` command finds the same root from the flow's --datastore.
    gc = run_on(FLOWS / "train_numpy.py", "--datastore", datastore, "checkpoint", "gc", "--dry-run")
    assert f"Listing {ROOTS[name]}/TrainFlow ..." in gc.output and re.search(rf"checkpoints +{len(checkpoints)} ", gc.output), gc.output


def test_azure_and_gcs_faults_are_classified_like_s3s():
    """The errors adlfs and gcsfs raise for 5xx and throttling are retried, 4xx are not, and
    azure-core's connection failures are retried (what retry.py decides from)."""
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
    from gcsfs.retry import HttpError

    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.retry import is_transient

    def azure(status):
        error = HttpResponseError(message=f"status {status}")
        error.status_code = status  # as azure-core sets it from the response
        return error

    assert all(is_transient(e) for e in (azure(503), azure(500), azure(429), HttpError({"code": 503, "message": "busy"}),
                                         HttpError({"code": 429, "message": "slow"}), ServiceRequestError("refused"),
                                         ServiceResponseError("reset")))
    assert not any(is_transient(e) for e in (azure(403), azure(404), HttpError({"code": 403, "message": "denied"})))


def test_a_background_save_commits_from_its_forked_child(backend):
    """A large save is written by a forked child (its own client, made after the fork) and is
    listed and loadable once wait() returns; the next attempt resumes from it."""
    import types

    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.saving import ASYNC_MIN_BYTES

    root = f"{BACKENDS[backend][2]}://{BUCKET}/ckpt-{uuid.uuid4().hex}"
    flow = types.SimpleNamespace(w=np.arange(ASYNC_MIN_BYTES // 8 + 1, dtype=np.float64), epoch=3)
    api = standalone(flow, root, LOC, 0, async_saves=True)
    pending = api.save()
    flow.w[:] = -1  # the child saw the state as it was at save()
    (done,) = api.wait()
    assert not pending.written and done.written >= ASYNC_MIN_BYTES  # written by the child
    assert done.key == pending.key and [a.key for a in api.list()] == [done.key]
    resumed = types.SimpleNamespace()
    assert standalone(resumed, root, LOC, 1).load() is not None
    assert resumed.epoch == 3 and resumed.w[-1] == ASYNC_MIN_BYTES // 8


NO_CREDENTIALS = """
from metaflow import FlowSpec, checkpoint, current, step

class NoCredentialsFlow(FlowSpec):
    @checkpoint
    @step
    def start(self):
        self.next(self.end)

    @step
    def end(self):
        pass

if __name__ == "__main__":
    NoCredentialsFlow()
"""


def test_missing_gcp_credentials_fail_the_task_naming_the_root_and_the_fix(run_on, write_flow, tmp_path):
    """Metaflow's default GCP provider finds no credentials (no ADC file, no metadata server):
    the step fails as it starts, in Metaflow's words, naming the step, the root and what to do."""
    root = f"gs://{BUCKET}/no-credentials"
    dead = f"127.0.0.1:{_free_port()}"
    env = {"METAFLOW_DEFAULT_GCP_CLIENT_PROVIDER": "gcp-default", "METAFLOW_IMPLICIT_CHECKPOINT_ROOT": root,
           "CLOUDSDK_CONFIG": str(tmp_path), "GCE_METADATA_HOST": dead, "GCE_METADATA_IP": dead}
    result = run_on(write_flow(NO_CREDENTIALS), "run", env=env, expect_ok=False)
    assert f"@checkpoint on step start: Cannot reach checkpoint storage {root}: Metaflow's GCP credentials failed" in result.output
    assert "gcloud auth application-default login" in result.output
    assert "Invalid @checkpoint:" in result.output  # Metaflow's own format for a MetaflowException
    assert "Traceback" not in result.output and "Internal error" not in result.output
