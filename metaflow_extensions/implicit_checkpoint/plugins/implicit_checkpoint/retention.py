"""Retention: which of a task's checkpoints to keep, applied in the task after each save.

``@checkpoint(keep={"last": 3, "best": ("loss", "min", 2)})`` keeps, over all attempts of the
task, the union of:

- the newest ``last`` checkpoints;
- the ``best`` k by a number in their metadata (``"min"`` or ``"max"``; checkpoints whose
  metadata lacks it, or holds a non-number or NaN, are not candidates; ties go to the newer);
- pinned checkpoints;
- every checkpoint an attempt loaded: the ``resumed_from`` of the task's checkpoints and the
  one loaded in the running attempt. This contains each kept checkpoint's resume spine (its
  ``resumed_from``, that one's, and so on, as far as it stays in this task), since every link
  is the ``resumed_from`` of a checkpoint that is kept and so listed;
- always the newest checkpoint, and the newest ``latest=True`` one (what a retry resumes from).

Everything else is retired (marks.py): hidden at once, purged by a later pass or by gc once
its tombstone is older than the grace period. Only committed checkpoints are listed, so a save
still being written in the background is neither counted nor touched.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

from .checkpointer import Checkpointer
from .exceptions import CheckpointConfigError
from .ids import task_order
from .manifest import CheckpointArtifact, TaskLocation
from .marks import GRACE_SECONDS, PINS, RETIRED, is_marked, purge, put_marker, retired_longer_than

EXAMPLE = "keep={'last': 3, 'best': ('loss', 'min', 2)}"


@dataclass(frozen=True)
class KeepPolicy:
    """What to keep: the newest ``last``, and the best ``best_k`` by ``best_metric``."""

    last: Optional[int] = None
    best_metric: Optional[str] = None
    best_mode: str = "min"
    best_k: int = 0


def parse_keep(value: Any) -> Optional[KeepPolicy]:
    """The policy of ``@checkpoint(keep=...)``; ``None`` keeps everything. Raises
    ``CheckpointConfigError`` saying what is wrong and showing the expected form."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise CheckpointConfigError(f"keep={value!r} must be a dict such as {EXAMPLE}.")
    unknown = sorted(set(value) - {"last", "best"}, key=str)
    if unknown:
        raise CheckpointConfigError(f"keep= has unknown key(s) {unknown}; use 'last' and/or 'best', as in {EXAMPLE}.")
    last = value.get("last")
    if last is not None and not _positive_int(last):
        raise CheckpointConfigError(f"keep['last']={last!r} must be a whole number of checkpoints, at least 1.")
    best = value.get("best")
    if best is None:
        return KeepPolicy(last=last)
    if (
        not isinstance(best, (tuple, list)) or len(best) != 3 or not isinstance(best[0], str)
        or not best[0] or best[1] not in ("min", "max") or not _positive_int(best[2])
    ):
        raise CheckpointConfigError(
            f"keep['best']={best!r} must be (metadata key, 'min' or 'max', how many), "
            "e.g. ('loss', 'min', 2)."
        )
    return KeepPolicy(last=last, best_metric=best[0], best_mode=best[1], best_k=best[2])


def kept_keys(checkpoints: list[CheckpointArtifact], policy: KeepPolicy, loaded: Optional[str] = None) -> set[str]:
    """Keys of the checkpoints to keep, of one task's checkpoints listed newest first."""
    if not checkpoints:
        return set()
    keep = {checkpoints[0].key}  # the newest
    newest_latest = next((c for c in checkpoints if c.latest), None)
    if newest_latest is not None:
        keep.add(newest_latest.key)
    keep.update(c.key for c in checkpoints[: policy.last or 0])
    keep.update(c.key for c in _best(checkpoints, policy))
    keep.update(c.key for c in checkpoints if c.pinned)
    keep.update(c.resumed_from for c in checkpoints if c.resumed_from)
    if loaded:
        keep.add(loaded)
    return keep & {c.key for c in checkpoints}  # only this task's checkpoints are retired


@dataclass(frozen=True)
class RetentionPass:
    kept: list[CheckpointArtifact]  # the task's checkpoints after the pass, newest first
    retired: list[str]  # keys retired by this pass
    purged: list[str]  # keys whose manifest this pass removed (retired longer than the grace)


def apply(
    checkpointer: Checkpointer, loc: TaskLocation, policy: KeepPolicy,
    loaded: Optional[str] = None, grace: float = GRACE_SECONDS,
) -> RetentionPass:
    """A full pass: list the task's committed checkpoints, retire what ``policy`` does not keep,
    then purge the task's checkpoints retired longer than ``grace`` seconds ago."""
    checkpoints = checkpointer.list(loc)
    keep = kept_keys(checkpoints, policy, loaded)
    retired = [c.key for c in checkpoints if c.key not in keep]
    for key in retired:
        put_marker(checkpointer.store, loc, RETIRED, key.rsplit("/", 1)[1])
    old = retired_longer_than(checkpointer.store, loc, grace)
    purged = purge(checkpointer.store, loc, old) if old else []
    return RetentionPass([c for c in checkpoints if c.key in keep], retired, [loc.key(i) for i in purged])


class Retainer:
    """Retention for one running attempt, cheap enough to follow every save.

    A full pass (``apply``: one listing of the task) runs first and then every
    ``RESYNC_SECONDS``; in between, a pass works from the checkpoints kept last time plus the
    ones saved since, and checks a checkpoint's pin marker just before retiring it, so a pin
    set meanwhile (from the CLI) is honoured. A save then costs one more object write when it
    retires a checkpoint, however many checkpoints the task has.
    """

    RESYNC_SECONDS = 60.0

    def __init__(self, checkpointer: Checkpointer, loc: TaskLocation, policy: KeepPolicy):
        self._checkpointer, self._loc, self._policy = checkpointer, loc, policy
        self._kept: Optional[dict[str, CheckpointArtifact]] = None
        self._synced = 0.0

    def after_saves(self, saved: list[CheckpointArtifact], loaded: Optional[str]) -> RetentionPass:
        """Apply the policy now that ``saved`` are committed."""
        if self._kept is None or time.monotonic() - self._synced >= self.RESYNC_SECONDS:
            done = apply(self._checkpointer, self._loc, self._policy, loaded)
            self._kept, self._synced = {c.key: c for c in done.kept}, time.monotonic()
            return done
        self._kept.update((c.key, c) for c in saved)
        checkpoints = sorted(self._kept.values(), key=lambda c: task_order(c.key.rsplit("/", 1)[1]), reverse=True)
        keep, store, retired = kept_keys(checkpoints, self._policy, loaded), self._checkpointer.store, []
        for c in checkpoints:
            if c.key in keep:
                continue
            checkpoint_id = c.key.rsplit("/", 1)[1]
            if is_marked(store, self._loc, PINS, checkpoint_id):
                self._kept[c.key] = replace(c, pinned=True)
                continue
            put_marker(store, self._loc, RETIRED, checkpoint_id)
            retired.append(self._kept.pop(c.key).key)
        return RetentionPass(list(self._kept.values()), retired, [])


def _best(checkpoints: list[CheckpointArtifact], policy: KeepPolicy) -> list[CheckpointArtifact]:
    if not policy.best_metric:
        return []
    scored = [(c.metadata.get(policy.best_metric), c) for c in checkpoints]
    scored = [(v, c) for v, c in scored if _number(v)]
    scored.sort(key=lambda vc: vc[0], reverse=policy.best_mode == "max")  # stable: newer first on ties
    return [c for _, c in scored[: policy.best_k]]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
