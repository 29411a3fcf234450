"""Reading files of a local checkpoint root without trusting what is there.

Anyone who can write to the root can put a FIFO, a device or a symbolic link where a manifest or
payload belongs. Opening a FIFO for reading blocks until a writer appears (forever); a link can
lead to any file of the machine. So every read here opens without blocking (``O_NONBLOCK``), and
accepts only a regular file, and a symbolic link only when it resolves inside the root. Anything
else is refused at once as damage, naming the path.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO, Optional

from .exceptions import CheckpointCorrupt

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_KINDS = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
          stat.S_ISSOCK: "a socket", stat.S_ISDIR: "a directory"}


def open_regular(path: str, root: str) -> int:
    """A file descriptor of the regular file at ``path``; raises ``FileNotFoundError`` if there
    is none and ``CheckpointCorrupt`` (without blocking) for anything that is not one."""
    try:
        fd = os.open(path, _FLAGS | os.O_NOFOLLOW)  # the common case: one call, no link
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        real, inside = os.path.realpath(path), os.path.realpath(root)
        if os.path.commonpath([real, inside]) != inside:
            raise CheckpointCorrupt(
                f"{path} is a symbolic link to {real}, outside the checkpoint root {root}: refused. "
                "Remove it; checkpoint storage holds only its own files."
            ) from None
        fd = os.open(path, _FLAGS)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS.items() if test(mode)), "not a regular file")
        raise CheckpointCorrupt(
            f"{path} is {kind}, not a checkpoint file: refused without reading it. Remove it."
        )
    return fd


def open_file(path: str, root: str) -> BinaryIO:
    """A regular file inside the root, opened for reading (see ``open_regular``)."""
    return os.fdopen(open_regular(path, root), "rb", buffering=0)  # reads go straight into the buffers


def read_small_file(path: str, root: str) -> Optional[bytes]:
    """A whole (small) regular file in one read, or None if it is gone."""
    try:
        fd = open_regular(path, root)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, 1 << 16)
        if len(data) < 1 << 16:
            return data  # a manifest, nearly always: one read
        chunks = [data]
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
