"""Fixtures: real storage backends for the core, and real Metaflow runs for end-to-end tests."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FLOWS = REPO / "flows"
TEST_FLOWS = Path(__file__).resolve().parent / "flows"
XSS = "<script>alert(1)</script>"


def pytest_collection_finish(session):
    """Say up front that the whole suite is slow (it runs hundreds of real Metaflow tasks)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and len(session.items) > 100:
        reporter.write_line(
            f"{len(session.items)} tests: about 15 minutes on two free cores, 20 or more on a busy "
            "machine (real Metaflow runs). One file: python -m pytest -q tests/test_errors.py"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The S3 API server (moto's) that the `s3_server` fixture starts on loopback. Metaflow reads its
# configuration once, when first imported, so its S3 settings go into the environment now, before
# any test imports metaflow; flow subprocesses inherit them. Dummy credentials: moto accepts any,
# and real ones must never reach it.
S3_BUCKET = "mf-test"
S3_ENDPOINT = f"http://127.0.0.1:{free_port()}"
S3_ENV = {
    "METAFLOW_S3_ENDPOINT_URL": S3_ENDPOINT,
    "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{S3_BUCKET}/metaflow",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "METAFLOW_IMPLICIT_CHECKPOINT_SECRET"):
    os.environ.pop(name, None)
os.environ.update(S3_ENV)

# Azure Blob (Azurite) and GCS (fake-gcs-server) emulators: their settings go into the environment
# now for the same reason; the servers start with the `azurite` and `gcs_server` fixtures.
from emulators import azurite, gcs_server, install_env  # noqa: E402,F401

install_env()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto) on 127.0.0.1 with an empty bucket; its endpoint URL."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request

    port = int(S3_ENDPOINT.rsplit(":", 1)[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    boto3.client("s3", endpoint_url=S3_ENDPOINT).create_bucket(Bucket=S3_BUCKET)
    yield S3_ENDPOINT
    server.stop()


def fresh_root(backend: str, request, tmp_path) -> str:
    if backend == "memory":
        return f"memory://ckpt-{uuid.uuid4().hex}"
    if backend == "s3":
        request.getfixturevalue("s3_server")
        return f"s3://{S3_BUCKET}/ckpt-{uuid.uuid4().hex}"
    return str(tmp_path / "ckpt")


@pytest.fixture(params=["memory", "local", "s3"])
def root_url(request, tmp_path):
    """A fresh checkpoint root on each real fsspec backend the core must support."""
    return fresh_root(request.param, request, tmp_path)


@pytest.fixture(params=["memory", "s3"])
def object_store_url(request, tmp_path):
    """A fresh root on each object store (no rename: one put is the commit)."""
    return fresh_root(request.param, request, tmp_path)


@pytest.fixture(params=["local", "s3"])
def shared_root_url(request, tmp_path):
    """A fresh root that several processes can reach."""
    return fresh_root(request.param, request, tmp_path)


class FlowRun:
    """The outcome of one `python flow.py ...` subprocess."""

    def __init__(self, proc: subprocess.CompletedProcess, flow_file: str = ""):
        self.proc = proc
        self.flow_file = flow_file
        self.output = proc.stdout + proc.stderr
        match = re.search(r"run-id (\S+?)\)?:", self.output)
        self.run_id = match.group(1) if match else None

    @property
    def ok(self) -> bool:
        return self.proc.returncode == 0


@pytest.fixture(scope="module")
def metaflow_home(tmp_path_factory):
    """A private .metaflow, shared by a test module, for its flows and for the client here."""
    from metaflow import namespace
    from metaflow.plugins.datastores.local_storage import LocalStorage

    home = tmp_path_factory.mktemp("mf")
    (home / ".metaflow").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        mp.setenv("USERNAME", "tester")
        mp.delenv("METAFLOW_IMPLICIT_CHECKPOINT_ROOT", raising=False)
        # Metaflow's client caches the .metaflow it found first; make it look again, here.
        mp.setattr(LocalStorage, "datastore_root", None)
        namespace(None)
        yield home


@pytest.fixture(scope="module")
def run_flow(metaflow_home):
    """Run a flow file for real: run_flow(path, "run", "--epochs", "3", env={...})."""

    def run(flow_file, *args, env=None, expect_ok=True):
        full_env = {**os.environ, "USERNAME": "tester", "METAFLOW_DEFAULT_DATASTORE": "local",
                    "METAFLOW_DEFAULT_METADATA": "local", **(env or {})}
        proc = subprocess.run(
            [sys.executable, str(flow_file), "--no-pylint", *args],
            cwd=metaflow_home, env=full_env, capture_output=True, text=True, timeout=300,
        )
        result = FlowRun(proc, str(flow_file))
        if expect_ok is not None:
            assert result.ok == expect_ok, result.output[-4000:]
        return result

    return run


@pytest.fixture
def write_flow(tmp_path):
    """Write a throwaway flow file from source text and return its path."""

    def write(source: str, name: str = "flow.py") -> Path:
        path = tmp_path / name
        path.write_text(source)
        return path

    return write


class CardTables(HTMLParser):
    """The rows of a card's tables by table class: each row's attributes and cell texts."""

    def __init__(self, html: str):
        super().__init__()
        self.tables: dict[str, list[dict]] = {}
        self._rows = None
        self._row = None
        self._cell = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._rows = self.tables.setdefault(attrs["class"], [])
        elif tag == "tr" and self._rows is not None and "data-key" in attrs:
            self._row = {**attrs, "class": (attrs.get("class") or "").split(), "cells": []}
            self._rows.append(self._row)
        elif tag == "td" and self._row is not None:
            self._row["cells"].append("")
            self._cell = True

    def handle_endtag(self, tag):
        if tag == "table":
            self._rows = None
        elif tag == "tr":
            self._row = None
        elif tag == "td" and self._row is not None:
            self._row["cells"][-1] = " ".join(self._row["cells"][-1].split())
            self._cell = False

    def handle_data(self, data):
        if self._cell:
            self._row["cells"][-1] += data

    def rows(self, table: str) -> list[dict]:
        return self.tables.get(table, [])


def assert_demo_checkpoints(checkpoints) -> None:
    """The checkpoints of flows/train_numpy.py's train task (killed at epochs 8 and 16, newest
    first): each attempt saved only its own epochs and ended at 8, 16 and 24. Its epochs take
    microseconds, so batching writes some of its 24 saves (the newest of each burst)."""
    attempts = [c.attempt for c in checkpoints]
    assert attempts == sorted(attempts, reverse=True) and set(attempts) == {0, 1, 2}, attempts
    for attempt, (first, last) in enumerate([(1, 8), (9, 16), (17, 24)]):
        epochs = [c.metadata["epoch"] for c in checkpoints if c.attempt == attempt]
        assert epochs[0] == last and all(first <= e <= last for e in epochs), (attempt, epochs)
