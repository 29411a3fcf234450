"""The notebook client: tables as repr and HTML (escaped), and loading only some fields."""
from __future__ import annotations

import types

import numpy as np
import pytest

from metaflow import Checkpoint
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.display import CheckpointList, human_bytes
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import CheckpointCorrupt
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation

LOC = TaskLocation("NbFlow", "3", "train", "8")
HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture
def saved(root_url):
    flow = types.SimpleNamespace(epoch=3, model=np.ones(5000), optimizer=np.zeros(5000))
    api = standalone(flow, root_url, LOC, async_saves=False)
    api.save(metadata={"loss": 0.123456, "note": "first"})
    flow.epoch = 4
    api.save(name=HOSTILE, metadata={"loss": 0.5, "comment": "<script>x()</script>"}, pin=True)
    return root_url, api.list()


def test_a_list_of_checkpoints_reprs_as_a_table(saved):
    """repr of Checkpoint().list(...) is a header plus one aligned row per checkpoint, with
    readable sizes, flags and metadata."""
    _, listed = saved
    lines = repr(CheckpointList(listed)).splitlines()
    assert lines[0].split() == ["KEY", "ATTEMPT", "NAME", "CREATED", "(UTC)", "SIZE", "FLAGS", "METADATA"]
    assert len(lines) == 3 and lines[1].startswith(listed[0].key) and lines[2].startswith(listed[1].key)
    assert "pinned" in lines[1] and "loss=0.1235" in lines[2] and "78.3 KiB" in lines[2]
    size_end = lines[0].index("SIZE") + len("SIZE")  # sizes are right-aligned under SIZE
    assert all(line.index(human_bytes(c.size)) + len(human_bytes(c.size)) == size_end
               for line, c in zip(lines[1:], listed))
    assert repr(CheckpointList()) == "(no checkpoints)" and CheckpointList(listed) == listed


def test_html_tables_escape_names_and_metadata(saved):
    """_repr_html_ of a list and of one checkpoint is a table with user text escaped."""
    _, listed = saved
    for html in (CheckpointList(listed)._repr_html_(), listed[0]._repr_html_()):
        assert html.startswith("<table>") and "<script>" not in html and HOSTILE not in html
        assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<th style='text-align:left'>FIELD</th>" in listed[0]._repr_html_()
    assert "numpy.ndarray" in listed[0]._repr_html_()


def test_load_fields_fetches_only_the_named_payloads(saved):
    """With the optimizer's payload deleted, load(fields=['model', 'epoch']) still works (it
    never reads that payload) while a full load fails naming the missing field."""
    root, listed = saved
    newest = listed[0]
    store_fs = standalone(types.SimpleNamespace(), root, LOC)._checkpointer.store
    ((digest, _),) = newest.field_payloads("optimizer")
    store_fs.fs.rm_file(f"{store_fs.flow_path('NbFlow')}/objects/{digest[:2]}/{digest}")
    values = Checkpoint(root=root).load(newest.key, fields=["model", "epoch"])
    assert set(values) == {"model", "epoch"} and values["epoch"] == 4 and values["model"].sum() == 5000
    with pytest.raises(CheckpointCorrupt, match="Field 'optimizer' .* is missing its payload"):
        Checkpoint(root=root).load(newest.key)


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                     (5 << 20, "5.0 MiB"), (3 << 30, "3.0 GiB"), (2 << 40, "2.0 TiB")])
def test_sizes_read_like_people_write_them(n, text):
    """human_bytes uses binary units with one decimal."""
    assert human_bytes(n) == text
