"""Installing the package: what a plain `pip install -e .` builds, and what `mfcheckpoint`
says when Metaflow did not load the extension."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

MFCHECKPOINT = Path(sys.executable).parent / "mfcheckpoint"


def test_a_plain_editable_install_is_a_compat_one(tmp_path):
    """`pip install -e .` with no --config-settings installs as setuptools' compat mode does:
    a .pth naming the repository (what Metaflow's extension scan sees), not an import hook
    (which Metaflow cannot see: `from metaflow import checkpoint` then fails)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO), "--target", str(tmp_path)],
        check=True, capture_output=True,
    )
    installed = [p for p in tmp_path.rglob("*") if p.is_file() and "metaflow_implicit_checkpoint" in p.name]
    assert [p.read_text().strip() for p in installed if p.suffix == ".pth"] == [str(REPO)]
    assert not [p for p in installed if "finder" in p.name]


def test_mfcheckpoint_says_how_to_install_when_metaflow_did_not_load_the_extension(tmp_path):
    """Metaflow told to look for extensions in an empty folder loads none of ours, as after a
    non-compat editable install: one line naming the fix, exit code 4, no traceback."""
    env = {**os.environ, "METAFLOW_EXTENSIONS_SEARCH_DIRS": str(tmp_path)}
    proc = subprocess.run([str(MFCHECKPOINT), "list", "TrainFlow/1"], env=env, capture_output=True, text=True)
    assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("Error: Metaflow did not load metaflow-implicit-checkpoint")
    assert "--config-settings editable_mode=compat" in proc.stderr
