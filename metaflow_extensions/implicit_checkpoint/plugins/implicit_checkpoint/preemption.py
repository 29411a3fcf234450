"""Preemption: SIGTERM, or Metaflow's spot-termination notice, tells the step to save and stop.

Kubernetes, and the spot reclaims of AWS, GCP and Azure, send SIGTERM and kill the process a
little later; Metaflow's spot monitor (``@batch``, ``@kubernetes`` on AWS spot) also writes the
notice to the file named by ``current.spot_termination_notice``. The order in a task:

1. ``install()`` (the decorator's ``task_pre_step``, in the task process's main thread): our
   SIGTERM handler, the previous one kept.
2. SIGTERM arrives (or ``preempted`` finds the notice file): ``preempted`` becomes True, the
   previous handler is put back (so a second SIGTERM acts as it always did) and a watchdog
   starts: ``grace`` seconds later the process sends itself SIGTERM again, whatever it is doing.
3. The step sees ``current.checkpoint.preempted``, saves and returns (or raises).
4. ``finish(flush)`` (the decorator's step wrapper, when the step function ends): if preempted,
   wait for pending saves, then send SIGTERM to itself: the process exits as SIGTERM would
   have made it (so ``@retry`` retries), only later. Not preempted: the handler is uninstalled.

Saves still pending when the watchdog fires are lost, as with a kill; committed ones never are.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, Optional


class Preemption:
    """SIGTERM and the spot-termination notice of one task process, as ``preempted``."""

    def __init__(self, where: str, grace: float, notice: Callable[[], Optional[str]] = lambda: None):
        self.where = where
        self.grace = grace
        self._notice = notice  # the notice file's path, if Metaflow's spot monitor runs
        self._owner: Optional[int] = None  # the process that installed the handler
        self._previous = signal.SIG_DFL
        self._preempted = False

    def install(self) -> bool:
        """Handle SIGTERM in this process; False where signals cannot be handled (not the
        main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        previous = signal.getsignal(signal.SIGTERM)
        self._previous = signal.SIG_DFL if previous is None else previous
        self._owner = os.getpid()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        return True

    @property
    def preempted(self) -> bool:
        """True once SIGTERM arrived or the spot-termination notice was written."""
        if not self._preempted and self._owner == os.getpid():
            path = self._notice()
            if path and os.path.exists(path):
                self._preempt("Metaflow's spot-termination notice")
        return self._preempted

    def finish(self, flush: Callable[[], object]) -> None:
        """The step function ended. Preempted: ``flush()`` pending saves, then exit as SIGTERM
        would. Otherwise: put the previous handler back."""
        if self._owner != os.getpid():
            return
        if not self._preempted:
            if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, self._previous)
            return
        try:
            flush()
        except Exception as exc:  # the task ends anyway; say why this save is missing
            print(f"@checkpoint: saves pending at preemption failed: {exc}", file=sys.stderr)
        print(f"@checkpoint: {self.where} stops after preemption (SIGTERM).", file=sys.stderr)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGTERM)  # the previous handler's turn: by default, the end

    def _on_sigterm(self, signum, frame) -> None:
        if os.getpid() != self._owner:  # a forked child (a background save, a data loader)
            signal.signal(signal.SIGTERM, self._previous)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self._preempt("SIGTERM")

    def _preempt(self, cause: str) -> None:
        self._preempted = True
        signal.signal(signal.SIGTERM, self._previous)
        # os.write, not print: the handler may have interrupted a write to sys.stderr.
        os.write(2, (
            f"@checkpoint: {cause} received in {self.where}: current.checkpoint.preempted is "
            f"True. Save and return: the task ends within {self.grace:g} s "
            "(METAFLOW_IMPLICIT_CHECKPOINT_PREEMPT_SECONDS), and a @retry resumes from that save.\n"
        ).encode())
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self) -> None:
        threading.Event().wait(self.grace)
        print(f"@checkpoint: {self.where} did not end within {self.grace:g} s of preemption; "
              "ending it now (SIGTERM).", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
