"""A fault-injecting wrapper around a real fsspec filesystem: the one fake the tests allow.

``FaultyFS(store.fs, rate=0.2)`` passes every call through to the real filesystem, except that a
storage call fails with probability ``rate`` (or as scripted with ``fail_next``), raising what S3
clients really raise on a bad day: s3fs's translations of 500/503 answers, botocore's connection
and read-timeout errors, a connection reset, a timeout. A fault strikes either before the call
reaches the storage or after it completed (the answer was lost, which a retry must survive).
``injected`` counts the faults raised.
"""
from __future__ import annotations

import errno
import random
from typing import Callable, Optional

from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
from s3fs.errors import translate_boto_error

CALLS = frozenset({"cat_file", "pipe_file", "exists", "ls", "find", "open", "mv", "rm_file", "makedirs"})
_AFTER_OK = CALLS - {"open"}  # a fault after open() would leak the open file


def answer(status: int, code: str) -> Exception:
    error = ClientError({"Error": {"Code": code, "Message": f"injected {code}"},
                         "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    return translate_boto_error(error)


TRANSIENT: list[Callable[[], Exception]] = [
    lambda: answer(503, "SlowDown"),
    lambda: answer(500, "InternalError"),
    lambda: answer(503, "ServiceUnavailable"),
    lambda: EndpointConnectionError(endpoint_url="http://injected"),
    lambda: ReadTimeoutError(endpoint_url="http://injected"),
    lambda: ConnectionClosedError(endpoint_url="http://injected"),
    lambda: ConnectionResetError(errno.ECONNRESET, "injected connection reset"),
    lambda: TimeoutError("injected timeout"),
]


class FaultyFS:
    """Delegates to ``fs``; storage calls in ``only`` (default: all) fail at ``rate``, a share
    ``after`` of them once the call has reached the storage."""

    def __init__(self, fs, rate: float = 0.0, seed: int = 0, only: Optional[set] = None,
                 after: float = 0.5, on_fault: Optional[Callable[[], None]] = None):
        self.fs, self.rate, self.only, self.after = fs, rate, set(only or CALLS), after
        self.injected = 0
        self._random = random.Random(seed)
        self._script: list[tuple[str, bool, Callable[[], Exception]]] = []
        self._on_fault = on_fault

    def fail_next(self, method: str, after: bool = False, error: Optional[Callable[[], Exception]] = None):
        """Script one fault: the next call of ``method`` fails (``after`` it reached the storage)."""
        self._script.append((method, after, error or TRANSIENT[0]))

    def __getattr__(self, name: str):
        real = getattr(self.fs, name)
        if name not in CALLS:
            return real

        def call(*args, **kwargs):
            fault = self._fault(name)
            if fault is None:
                return real(*args, **kwargs)
            after, make = fault
            if after:
                real(*args, **kwargs)
            self.injected += 1
            if self._on_fault is not None:
                self._on_fault()
            raise make()

        return call

    def _fault(self, name: str):
        for i, (method, after, make) in enumerate(self._script):
            if method == name:
                del self._script[i]
                return after, make
        if name in self.only and self._random.random() < self.rate:
            after = name in _AFTER_OK and self._random.random() < self.after
            return after, self._random.choice(TRANSIENT)
        return None
