"""Folders as state (files.py): saved file by file as chunks, restored whole to their path by
load(), listed by inspect(); in the core and in a real flow killed mid-way."""
from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
from metaflow import Run

from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.files import Directory
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import open_store

from conftest import FLOWS, CardTables
from test_card import card_html

LOC = TaskLocation("FilesFlow", "1", "train", "3")


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mode & 0o777)
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "adapter"
    (root / "sub").mkdir(parents=True)
    (root / "base.bin").write_bytes(os.urandom(6 << 20))  # the frozen base: three chunks
    (root / "adapter.bin").write_bytes(b"a" * 5000)
    (root / "sub" / "config.json").write_text('{"r": 8}')
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to(root / "base.bin")
    return root


def test_a_folder_is_saved_file_by_file_and_an_unchanged_file_costs_nothing(tmp_path, folder):
    """The second save, after the adapter changed, writes the adapter, not the 6 MB base;
    inspect() lists every file with its size and names the symbolic link it left out."""
    flow = types.SimpleNamespace(out=Directory(str(folder)), epoch=1)
    api = standalone(flow, str(tmp_path / "ckpt"), LOC)
    first = api.save(wait=True)
    (folder / "adapter.bin").write_bytes(b"b" * 5000)
    second = api.save(wait=True)
    assert first.written > 6 << 20 and second.written < 20_000
    field = api.inspect(second)["fields"]["out"]
    assert dict(map(tuple, field["files"])) == {"adapter.bin": 5000, "base.bin": 6 << 20,
                                                "run.sh": 10, "sub/config.json": 8}
    assert field["skipped"] == ["link"] and field["type"].endswith("Directory")


def test_load_writes_the_folder_back_whole_as_it_was_at_the_save(tmp_path, folder):
    """A retry's load() replaces whatever the killed attempt left (changed, extra or missing
    files) with exactly the saved files, permission bits included."""
    saved = tree(folder)
    flow = types.SimpleNamespace(out=Directory(str(folder)))
    standalone(flow, str(tmp_path / "ckpt"), LOC).save(wait=True)
    (folder / "adapter.bin").write_bytes(b"half written")
    (folder / "sub" / "config.json").unlink()
    (folder / "stray.tmp").write_bytes(b"x")
    retry = types.SimpleNamespace()
    assert standalone(retry, str(tmp_path / "ckpt"), LOC, attempt=1).load() is not None
    assert tree(folder) == saved and isinstance(retry.out, Directory) and retry.out.path == str(folder)
    assert not list(folder.parent.glob("adapter.restoring-*"))


def test_reading_a_checkpoint_elsewhere_writes_nothing_until_asked(tmp_path, folder):
    """Restoring a checkpoint as a dict (notebook, partial load) holds the files in memory and
    writes nothing; restore(to=...) writes them where asked."""
    flow = types.SimpleNamespace(out=Directory(str(folder)), n=1)
    saved = standalone(flow, str(tmp_path / "ckpt"), LOC).save(wait=True)
    before = tree(folder)
    (folder / "adapter.bin").write_bytes(b"newer")
    reader = Checkpointer(open_store(str(tmp_path / "ckpt")))
    assert reader.restore(saved, fields=["n"]) == {"n": 1}
    values = reader.restore(saved)
    assert (folder / "adapter.bin").read_bytes() == b"newer"  # untouched by either read
    copy = values["out"].restore(to=str(tmp_path / "copy"))
    assert tree(Path(copy.path)) == before


def test_a_missing_folder_fails_the_save_naming_the_attribute(tmp_path):
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import CheckpointSaveError

    flow = types.SimpleNamespace(out=Directory(str(tmp_path / "nowhere")))
    with pytest.raises(CheckpointSaveError, match=r"self\.out .*no such folder"):
        standalone(flow, str(tmp_path / "ckpt"), LOC).save(wait=True)


def test_a_killed_run_resumes_with_its_folder_restored(run_flow):
    """flows/files_state.py: killed at epoch 3 after scribbling over its adapter file; the
    retry finds the folder as saved at epoch 3 and ends with the same files as a run that was
    never killed; Metaflow's artifact of the attribute holds the path only."""
    crashed = run_flow(FLOWS / "files_state.py", "run")
    clean = run_flow(FLOWS / "files_state.py", "run", "--crash-at", "0")
    assert "attempt 1: resumed at epoch 3" in crashed.output
    a, b = Run(f"FilesFlow/{crashed.run_id}"), Run(f"FilesFlow/{clean.run_id}")
    assert a.data.digest == b.data.digest and a.data.epoch == 5
    assert a.data.out.path == f"adapter-{crashed.run_id}" and a.data.out._files is None
    html = card_html(run_flow, FLOWS / "files_state.py", f"{crashed.run_id}/start")
    row = CardTables(html).rows("checkpoints")[-1]
    assert "out (3 files)" in row["cells"][4]  # the card's Fields column names the folder's files
    assert "adapter.bin (32.0 KiB)" in html and "base.bin (4.0 MiB)" in html
