"""Retrying storage calls through transient faults, bounded in total time.

Object stores fail transiently all the time: 5xx answers, throttling ("SlowDown"), connection
resets, timeouts. One policy governs every storage call of a checkpoint: exponential backoff with
full jitter (each wait is uniform in ``[0, min(cap, base * 2**n)]``, so a fleet of tasks that failed
together does not retry in lockstep), and no new attempt once ``deadline`` seconds would pass.
Anything that is not transient (missing object, access denied, bad request) is raised at once.

The S3 client's own retries are turned off (see ``storage_options``) so that this bound holds, and
no call may outlast its own time limit (``within``): a hung endpoint fails a save within the
deadline plus one call's limit, instead of waiting forever for an answer.
"""
from __future__ import annotations

import errno
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

# errno values that s3fs gives translated 5xx/throttling answers, or that a socket gives a blip.
_TRANSIENT_ERRNOS = {
    errno.EBUSY,  # 503 SlowDown / ServiceUnavailable
    getattr(errno, "EREMOTEIO", errno.EIO),  # 500 InternalError
    errno.EAGAIN,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EPIPE,
}
# Transport errors of botocore and aiohttp, matched by class name so the core never imports them.
_TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ResponseStreamingError",
    "HTTPClientError",
    "ResponseParserError",
    "IncompleteReadError",
    "ClientPayloadError",
    "ServerDisconnectedError",
    "ClientConnectionError",
    "ServiceRequestError",  # azure-core: the request never reached the service
    "ServiceResponseError",  # azure-core: the connection broke before an answer
}
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException) -> bool:
    """True for faults worth retrying: 5xx, 429/throttling, connection resets, timeouts."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    status = _http_status(exc) or _http_status(exc.__cause__)
    if status is not None:
        return status >= 500 or status == 429
    if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def _http_status(exc: Optional[BaseException]) -> Optional[int]:
    response = getattr(exc, "response", None)  # botocore's ClientError
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    # azure-core's HttpResponseError has status_code, gcsfs's HttpError code
    for name in ("status_code", "code"):
        status = getattr(exc, name, None)
        if isinstance(status, int) and 100 <= status < 600:
            return status
    return None


class GaveUp(Exception):
    """A transient fault outlasted the retry deadline; ``last`` is the final error."""

    def __init__(self, last: BaseException, attempts: int, seconds: float):
        super().__init__(f"{last} (still failing after {attempts} attempts over {seconds:.1f} s)")
        self.last, self.attempts, self.seconds = last, attempts, seconds


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter; no new attempt after ``deadline`` seconds."""

    deadline: float = 60.0
    base: float = 0.1
    cap: float = 5.0

    def call(
        self,
        fn: Callable[..., Any],
        *args: Any,
        on_retry: Optional[Callable[[BaseException], None]] = None,
        **kwargs: Any,
    ) -> Any:
        """``fn(*args, **kwargs)``, retried through transient faults; raises ``GaveUp`` when
        they outlast the deadline and any other error at once."""
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                delay = random.uniform(0, min(self.cap, self.base * 2 ** (attempt - 1)))
                elapsed = time.monotonic() - started
                if elapsed + delay > self.deadline:
                    raise GaveUp(exc, attempt, elapsed) from exc
                if on_retry is not None:
                    on_retry(exc)
                time.sleep(delay)


class CallTimedOut(TimeoutError):
    """A storage call got no answer within its time limit (a transient fault: retried)."""


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``, but give up waiting after ``seconds``: a hung endpoint (a connection accepted
    and never answered) must not hold a save past its deadline. The call runs in a daemon
    thread that is abandoned if it overruns; what it was doing is retried or reported."""
    box: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="checkpoint-storage-call", daemon=True).start()
    if not done.wait(seconds):
        raise CallTimedOut(f"no answer within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]
