"""A fault-injection fake: local files behind a protocol of their own, whose writes can be made
slow or failing. Used only to provoke slow storage and failed writes; everything else is real."""
from __future__ import annotations

import time

import fsspec
from fsspec.implementations.local import LocalFileSystem


class FaultyFileSystem(LocalFileSystem):
    protocol = ("faultyfile",)
    write_delay = 0.0  # seconds each object write takes
    fail_paths: tuple = ()  # writes to paths containing any of these strings fail

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("faultyfile://"):
            path = path[len("faultyfile://"):]
        return super()._strip_protocol(path)

    def unstrip_protocol(self, name):
        return "faultyfile://" + self._strip_protocol(name)

    def touch(self, path, truncate=True, **kwargs):
        if any(p in path for p in self.fail_paths):
            raise OSError(f"injected write failure for {path}")
        return super().touch(path, truncate=truncate, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            if any(p in path for p in self.fail_paths):
                raise OSError(f"injected write failure for {path}")
            time.sleep(self.write_delay)
        if "w" in mode:
            self.makedirs(self._parent(path), exist_ok=True)
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("faultyfile", FaultyFileSystem, clobber=True)
