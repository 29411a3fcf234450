"""Fixtures: real storage backends for the core, and real Metaflow runs for end-to-end tests."""
from __future__ import annotations

import os
import re
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


def save_state(checkpointer, loc, attempt, state, **kwargs):
    """Save a dict as a checkpoint through the core (capture, then commit) and return it."""
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.snapshot import DEFAULT_SERIALIZER
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.writer import capture, commit

    return commit(checkpointer.store, capture(DEFAULT_SERIALIZER, loc, attempt, state, **kwargs))


@pytest.fixture(params=["memory", "local"])
def root_url(request, tmp_path):
    """A fresh checkpoint root on each real fsspec backend the core must support."""
    if request.param == "memory":
        return f"memory://ckpt-{uuid.uuid4().hex}"
    return str(tmp_path / "ckpt")


class FlowRun:
    """The outcome of one `python flow.py ...` subprocess."""

    def __init__(self, proc: subprocess.CompletedProcess):
        self.proc = proc
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
        result = FlowRun(proc)
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
