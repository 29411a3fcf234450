"""Files and folders as state: ``Directory(path)`` kept on ``self``.

Frameworks write their state as files (an adapter folder, a tokenizer, a Trainer's checkpoint
folder). A step makes a folder part of its checkpoints by keeping a ``Directory`` on ``self``::

    self.adapter = Directory("lora-out")      # the framework writes into lora-out/
    current.checkpoint.save()                  # every file under lora-out/ is in the checkpoint

Each save reads every regular file under the folder (its path relative to the folder, its
permission bits and its bytes); each file's bytes are an out-of-band buffer, stored as
content-addressed chunks like any array (``payloads.py``): a file that did not change is not
written again, whatever its size (it is read and hashed at each save). Symbolic links and
special files are left out, and named in the field's ``skipped``.

``load()`` writes the files back to the same path (relative paths against the working
directory, as when saved): into a sibling folder first, which then replaces the folder whole,
so a crash never leaves it half restored, and files the checkpoint did not hold are gone.
Unpickling only holds the files in memory: a partial load or a load for inspection writes
nothing; ``current.checkpoint.load()`` restores them, ``Checkpoint().load()`` returns the
``Directory`` with its files, for ``restore(to=...)``. Metaflow's own artifact of the
attribute (pickled with an older protocol at the end of the step) holds the path only.
"""
from __future__ import annotations

import os
import pickle
import shutil
import stat
import uuid
from typing import Any, Optional


class Directory:
    """A folder whose files are part of the step's checkpoints (see the module docstring)."""

    def __init__(self, path: str):
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise TypeError(f"Directory(path) takes a folder's path, not {path!r}")
        self.path = os.fspath(path)
        self._files: Optional[list] = None  # (relative path, mode, bytes) held since a load
        self._listing: Optional[list] = None  # [relative path, size] of the last save
        self.skipped: list[str] = []

    def __repr__(self) -> str:
        held = f", {len(self._files)} files to restore" if self._files is not None else ""
        return f"Directory({self.path!r}{held})"

    def files(self) -> list[tuple[str, int]]:
        """(relative path, size) of the regular files under the folder (or held since a load)."""
        if self._files is not None:
            return [(rel, len(data)) for rel, _, data in self._files]
        return [(rel, info.st_size) for rel, _, info in self._walk()]

    def restore(self, to: Optional[str] = None) -> "Directory":
        """Write the files a load brought back to ``to`` (default: the saved path), replacing
        that folder whole; returns the ``Directory`` of the restored folder."""
        if self._files is None:
            raise ValueError(f"{self!r} holds no files to restore: it was not loaded from a checkpoint.")
        target = os.fspath(to) if to is not None else self.path
        staging = f"{target.rstrip(os.sep)}.restoring-{uuid.uuid4().hex[:8]}"
        for rel, mode, data in self._files:
            dest = os.path.join(staging, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(data)
            os.chmod(dest, mode)
        os.makedirs(staging, exist_ok=True)  # an empty folder is a folder too
        old = f"{staging}.old"
        if os.path.lexists(target):
            os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
        restored = Directory(target)
        self._files = None  # the bytes are on disk now: not held twice
        return restored

    def _walk(self):
        """(relative path, full path, lstat) of each regular file, sorted; ``skipped`` the rest."""
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"Directory({self.path!r}): no such folder")
        self.skipped = []
        for folder, dirs, names in os.walk(self.path):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(folder, name)
                rel, info = os.path.relpath(full, self.path), os.lstat(full)
                if stat.S_ISREG(info.st_mode):
                    yield rel, full, info
                else:
                    self.skipped.append(rel)

    def _read(self) -> list[tuple[str, int, bytes]]:
        found = []
        for rel, full, info in self._walk():
            with open(full, "rb") as f:
                found.append((rel, stat.S_IMODE(info.st_mode), f.read()))
        return found

    def __reduce_ex__(self, protocol: int) -> tuple:
        if protocol < 5:  # Metaflow's own artifact: the path only (the checkpoint holds the files)
            return Directory, (self.path,)
        files = self._files if self._files is not None else self._read()
        self._listing = [[rel, len(data)] for rel, _, data in files]  # for describe(), this save's
        meta = tuple((rel, mode) for rel, mode, _ in files)
        return _loaded, (self.path, meta, *(pickle.PickleBuffer(data) for _, _, data in files))

    def describe(self) -> dict:
        """What ``inspect()`` shows of it after a save: its files and sizes, and what was left out."""
        listed = self._listing if self._listing is not None else [list(f) for f in self.files()]
        return {"files": listed, **({"skipped": list(self.skipped)} if self.skipped else {})}


def _loaded(path: str, meta: tuple, *buffers: Any) -> Directory:
    """A ``Directory`` as a load brings it back: its files held, not yet written."""
    found = Directory(path)
    found._files = [(rel, mode, bytes(data)) for (rel, mode), data in zip(meta, buffers)]
    return found


def restore_all(values: dict) -> dict:
    """Write back the folders among loaded values (``current.checkpoint.load()``)."""
    return {name: v.restore() if isinstance(v, Directory) and v._files is not None else v for name, v in values.items()}
