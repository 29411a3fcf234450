"""The `checkpoint` commands against real runs of flows/retention.py: `python flow.py checkpoint
...` and the standalone `mfcheckpoint`, their output and their exit codes, on every storage
backend of the `backend` fixture."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from metaflow import Checkpoint, Run

from conftest import FLOWS, S3_BUCKET
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.storage_options import storage_options
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import EMPTY_DIGEST, INLINE_MAX, CheckpointStore

FLOW = FLOWS / "retention.py"
MFCHECKPOINT = Path(sys.executable).parent / "mfcheckpoint"  # installed by setup.py's entry point


@dataclass(frozen=True)
class Backend:
    root: str  # where the runs store checkpoints
    env: dict  # environment for the flows and the commands


@pytest.fixture(scope="module", params=["local", "s3"])
def backend(request, metaflow_home):
    """The checkpoint storage the runs and commands use: a local folder, or S3 on the moto
    server (reached through Metaflow's S3 settings, which conftest sets for every process)."""
    if request.param == "s3":
        request.getfixturevalue("s3_server")
        root = f"s3://{S3_BUCKET}/cli-{uuid.uuid4().hex}"
    else:
        root = str(metaflow_home / "checkpoints")
    return Backend(root, {"METAFLOW_IMPLICIT_CHECKPOINT_ROOT": root})


@pytest.fixture(scope="module")
def runs(run_flow, backend):
    """Two runs (different weights), each killed at epoch 12 and resumed: 30 saves, 6 kept."""
    return [run_flow(FLOW, "run", "--seed", str(seed), env=backend.env).run_id for seed in (1, 2)]


def flow_cli(run_flow, backend, *args):
    return run_flow(FLOW, "checkpoint", *args, env=backend.env, expect_ok=None).proc


def mfcheckpoint(metaflow_home, backend, *args):
    env = {**os.environ, "USERNAME": "tester", "METAFLOW_DEFAULT_METADATA": "local", **backend.env}
    return subprocess.run([str(MFCHECKPOINT), *args], cwd=metaflow_home, env=env, capture_output=True, text=True)


def listed(proc) -> list[dict]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def epochs(checkpoints) -> list[int]:
    return [c["metadata"]["epoch"] for c in checkpoints]


def test_retention_in_a_real_run_keeps_the_promised_checkpoints(runs, run_flow, backend):
    """Of 30 saves over two attempts, the newest 2, the best 2 by loss, the pinned epoch 10 and
    epoch 12 (which attempt 1 resumed from) are listed, as a table and as JSON."""
    assert Run(f"RetentionFlow/{runs[1]}").data.kept == [10, 12, 18, 19, 29, 30]
    table = flow_cli(run_flow, backend, "list")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == ["KEY", "ATTEMPT", "NAME"]
    rows = table.stdout.splitlines()[1:]
    assert [int(re.search(r"epoch=(\d+)", line).group(1)) for line in rows] == [30, 29, 19, 18, 12, 10]
    task = Run(f"RetentionFlow/{runs[1]}")["start"].task
    assert table.stdout.strip() == repr(Checkpoint().list(task))  # the notebook shows the same table
    as_json = listed(flow_cli(run_flow, backend, "list", "--json"))
    assert epochs(as_json) == [30, 29, 19, 18, 12, 10] and [c["pinned"] for c in as_json] == [False] * 5 + [True]
    assert all(c["key"].startswith(f"RetentionFlow/{runs[1]}/start/1/root/") for c in as_json)
    assert epochs(listed(flow_cli(run_flow, backend, "list", f"{runs[1]}/start", "--attempt", "0", "--json"))) == [12, 10]
    empty = flow_cli(run_flow, backend, "list", "start", "--name", "nope")
    assert (empty.returncode, empty.stdout, empty.stderr.splitlines()[-1]) == (0, "", "No checkpoints.")


def test_mfcheckpoint_lists_without_a_flow_file(runs, run_flow, metaflow_home, backend):
    """The standalone command gives the same JSON as the flow's, by pathspec (storage found in
    task metadata) and by key with --root (no metadata needed)."""
    from_flow = listed(flow_cli(run_flow, backend, "list", runs[1], "--json"))
    assert listed(mfcheckpoint(metaflow_home, backend, "list", f"RetentionFlow/{runs[1]}", "--json")) == from_flow
    inspected = mfcheckpoint(metaflow_home, backend, "--root", backend.root, "inspect", from_flow[0]["key"], "--json")
    assert json.loads(inspected.stdout)["key"] == from_flow[0]["key"]


def test_inspect_and_lineage_read_like_the_run(runs, run_flow, backend):
    """inspect shows the checkpoint and one line per field; lineage of the newest skips the
    deleted saves and goes back through the checkpoint attempt 1 resumed from."""
    newest, *_, resumed, pinned = listed(flow_cli(run_flow, backend, "list", runs[1], "--json"))
    text = flow_cli(run_flow, backend, "inspect", newest["key"]).stdout
    assert re.search(rf"^resumed from\s+{re.escape(resumed['key'])}$", text, re.M)
    assert re.search(r"^w\s+numpy\.ndarray\s+128\.\d KiB\s+128x128 float64$", text, re.M)
    assert re.search(r"^status\s+live$", text, re.M)
    assert re.search(r"^status\s+pinned$", flow_cli(run_flow, backend, "inspect", pinned["key"]).stdout, re.M)
    as_json = json.loads(flow_cli(run_flow, backend, "inspect", newest["key"], "--json").stdout)
    assert (as_json["resumed_from"], as_json["pinned"], as_json["deleted"]) == (resumed["key"], False, False)
    chain = flow_cli(run_flow, backend, "lineage", newest["key"]).stdout.splitlines()[1:]
    assert [int(re.search(r"epoch=(\d+)", line).group(1)) for line in chain] == [12, 29, 30]


def test_pin_and_unpin_by_key(runs, run_flow, backend):
    """pin marks a checkpoint pinned in list(); unpin clears it; both print what they did."""
    best = next(c for c in listed(flow_cli(run_flow, backend, "list", runs[1], "--json")) if c["metadata"]["epoch"] == 18)
    assert flow_cli(run_flow, backend, "pin", best["key"]).stdout == f"Pinned {best['key']}\n"
    pins = {c["metadata"]["epoch"] for c in listed(flow_cli(run_flow, backend, "list", runs[1], "--json")) if c["pinned"]}
    assert pins == {10, 18}
    assert flow_cli(run_flow, backend, "unpin", best["key"]).stdout == f"Unpinned {best['key']}\n"
    after = listed(flow_cli(run_flow, backend, "list", runs[1], "--json"))
    assert not next(c for c in after if c["key"] == best["key"])["pinned"]


def test_errors_are_one_plain_sentence_and_an_exit_code(runs, run_flow, backend):
    """Bad key: 2; no such checkpoint or run: 1; deleting a pinned checkpoint: 3; bad option: 2;
    never a traceback."""
    pinned = listed(flow_cli(run_flow, backend, "list", runs[1], "--json"))[-1]["key"]
    missing = f"RetentionFlow/{runs[1]}/start/1/root/20200101T000000000000Z-a0-0123abcd"
    cases = [
        (("inspect", "nonsense"), 2, "Error: 'nonsense' is not a checkpoint key"),
        (("inspect", missing), 1, f"Error: No checkpoint {missing}"),
        (("lineage", "RetentionFlow/1/start/9/root/20200101T000000000000Z-a0-0123abcd"), 1, "does not exist"),
        (("delete", pinned), 3, f"Error: Checkpoint {pinned} is pinned; unpin it first to delete it."),
        (("list", "424242/start"), 1, "Error: Step('RetentionFlow/424242/start') does not exist"),
        (("delete", "start"), 2, "Error: 'start' is a step; name a run (its id) instead."),
        (("gc", "--grace", "-5"), 2, "-5"),
        (("list", "RetentionFlow/../RetentionFlow"), 2, "Error: 'RetentionFlow/../RetentionFlow' is not"),
        (("inspect", pinned + "\n"), 2, "is not a checkpoint key"),
    ]
    for args, code, message in cases:
        proc = flow_cli(run_flow, backend, *args)
        outcome = (proc.returncode, message in proc.stderr, "Traceback" in proc.stderr)
        assert outcome == (code, True, False), (args, proc.stderr)


def payloads(backend) -> set[str]:
    store = CheckpointStore(backend.root, storage_options(backend.root))
    return {p.rsplit("/", 1)[1] for p in store.fs.find(store.flow_path("RetentionFlow")) if "/objects/" in p and EMPTY_DIGEST not in p}


def referenced(runs) -> set[str]:
    """Payload hashes of every checkpoint still listed in the runs."""
    found = set()
    for run_id in runs:
        for checkpoint in Checkpoint().list(Run(f"RetentionFlow/{run_id}")["start"].task):
            found |= {digest for digest, size in checkpoint.payloads() if size > INLINE_MAX}
    return found


def test_delete_a_run_then_gc_frees_exactly_the_unreachable_payloads(runs, run_flow, backend, metaflow_home):
    """gc with the default grace deletes nothing young; `delete RUN` keeps the pinned one;
    `gc --dry-run` changes nothing; `gc --grace 0` leaves exactly the payloads the remaining
    checkpoints reference, and those still load."""
    before = payloads(backend)
    young = flow_cli(run_flow, backend, "gc")
    assert "freed        0 B in 0 unreferenced payloads deleted" in young.stdout and payloads(backend) == before
    deleted = flow_cli(run_flow, backend, "delete", runs[0])
    assert deleted.stdout == f"Deleted 5 checkpoints of run RetentionFlow/{runs[0]}\n"
    assert "Kept 1 pinned (unpin to delete):" in deleted.stderr
    assert epochs(listed(flow_cli(run_flow, backend, "list", runs[0], "--json"))) == [10]
    dry = mfcheckpoint(metaflow_home, backend, "--root", backend.root, "gc", "--dry-run", "--grace", "0")
    assert "dry run: nothing changed" in dry.stdout and payloads(backend) == before
    real = flow_cli(run_flow, backend, "gc", "--grace", "0")
    after, expected = payloads(backend), referenced(runs)
    assert after == expected and len(expected) == 7 and len(before) == 60
    assert f"in {len(before) - len(after)} unreferenced payloads deleted" in real.stdout
    assert f"in {len(before) - len(after)} unreferenced payloads would be deleted" in dry.stdout
    assert "Listing" in real.stderr and "purging 53 retired checkpoints" in real.stderr  # 24 + 24 + 5
    newest = Checkpoint().list(Run(f"RetentionFlow/{runs[1]}")["start"].task)[0]
    assert Checkpoint().load(newest)["epoch"] == 30


def test_the_notebook_client_reads_a_task_of_another_namespace(runs):
    """In someone else's namespace, Checkpoint() still lists, loads only the asked-for field,
    and follows lineage of the run's task."""
    from metaflow import get_namespace, namespace

    before = get_namespace()
    namespace("user:somebody-else")
    try:
        listing = Checkpoint().list(f"RetentionFlow/{runs[1]}/start/1")
        assert [c.metadata["epoch"] for c in listing] == [30, 29, 19, 18, 12, 10]
        assert set(Checkpoint().load(listing[0], fields=["epoch"])) == {"epoch"}
        assert [c.metadata["epoch"] for c in Checkpoint().lineage(listing[0])] == [12, 29, 30]
    finally:
        namespace(before)


def test_without_a_user_name_pathspecs_work_and_the_latest_run_says_what_to_do(runs, metaflow_home, backend):
    """With no user name in the environment, a pathspec still lists (any namespace is
    readable), in the CLI and the notebook client; the latest run, which is looked up in the
    user's namespace, is a one-line error saying to set USERNAME or name the run."""
    env = {k: v for k, v in os.environ.items() if k not in ("METAFLOW_USER", "SUDO_USER", "USERNAME", "USER")}
    env.update(METAFLOW_DEFAULT_METADATA="local", **backend.env)

    def run(*args):
        return subprocess.run(args, cwd=metaflow_home, env=env, capture_output=True, text=True)

    assert epochs(listed(run(str(MFCHECKPOINT), "list", f"RetentionFlow/{runs[1]}", "--json"))) == [30, 29, 19, 18, 12, 10]
    latest = run(str(MFCHECKPOINT), "list", "RetentionFlow")
    assert latest.returncode == 2 and "Traceback" not in latest.stderr, latest.stderr
    assert latest.stderr.startswith("Error: Metaflow could not determine your user name") and "Set USERNAME" in latest.stderr
    client = run(sys.executable, "-c", "from metaflow import Checkpoint; "
                 f"print([c.metadata['epoch'] for c in Checkpoint().list(task='RetentionFlow/{runs[1]}/start/1')])")
    assert client.stdout.strip() == "[30, 29, 19, 18, 12, 10]", client.stderr
