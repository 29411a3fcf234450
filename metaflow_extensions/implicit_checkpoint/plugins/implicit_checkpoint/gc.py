"""Garbage collection by reachability over one flow's storage.

Payloads are shared by every checkpoint, task and run of a flow, so one can be deleted only
when no manifest references it. In this order:

1. list everything stored for the flow, once (manifests, pins, tombstones, payloads);
2. read every manifest that stays (live ones, and retired ones still within the grace period,
   which readers may still load) and collect the payload hashes they reference;
3. purge the manifests retired longer than the grace period ago (manifest, then tombstone);
4. delete the payloads no remaining manifest references that are also older than the grace
   period (a save in progress has written payloads but not yet its manifest; they are young).

Nothing is deleted before every remaining manifest was read, so an unreadable one stops gc
with nothing changed; manifests go before payloads, so a crash in between leaves only
unreferenced payloads (the next gc removes them), never a manifest missing its payloads.
Small payloads live inside their manifests (writer.py) and go with them. Stale temporary files
of crashed local writes are removed like unreferenced payloads. Deletes are batched (one
request per 1000 objects on object stores).
"""
from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass, field
from typing import Callable

from .exceptions import CheckpointError
from .manifest import read_manifest
from .marks import GRACE_SECONDS, PINS, RETIRED, mtime_of, remove_paths
from .store import EMPTY_DIGEST, CheckpointStore

Progress = Callable[[str], None]
_READ_BATCH = 256


@dataclass(frozen=True)
class GcReport:
    """What gc found and did (or, with ``dry_run``, would do) for one flow."""

    flow: str
    url: str
    dry_run: bool
    checkpoints: int  # manifests that remain: live ones plus retired ones within the grace
    retired_waiting: int  # of those, retired ones still within the grace period
    purged: int  # manifests of checkpoints retired longer than the grace period ago
    logical_bytes: int  # sum of the sizes of the remaining checkpoints
    payloads: int  # payload objects stored before gc
    physical_bytes: int  # their bytes
    freed_payloads: int  # unreferenced payloads (and stale temporary files) deleted
    freed_bytes: int
    young_unreferenced: int  # unreferenced payloads kept because younger than the grace


@dataclass
class _Inventory:
    manifests: dict = field(default_factory=dict)  # (task folder, id) -> path
    markers: dict = field(default_factory=dict)  # (kind, task folder, id) -> (path, age)
    payloads: dict = field(default_factory=dict)  # digest -> (path, size, age)
    temp: list = field(default_factory=list)  # (path, size, age)


def flows_under(store: CheckpointStore) -> list[str]:
    """Names of the flows that have storage under the root."""
    try:
        entries = store.fs.ls(store.root, detail=True)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")


def collect(
    store: CheckpointStore, flow: str, grace: float = GRACE_SECONDS, dry_run: bool = False,
    progress: Progress = lambda message: None,
) -> GcReport:
    """Purge expired retired checkpoints and delete unreachable payloads of ``flow``."""
    url = f"{store.url}/{flow}"
    progress(f"Listing {url} ...")
    inv = _inventory(store, flow)
    progress(f"  found {len(inv.manifests)} checkpoint manifests and {len(inv.payloads)} payloads")
    expired = ({k for k, (_, age) in _retired(inv).items() if age >= grace} - _pinned(inv)) & inv.manifests.keys()
    remaining = {k: p for k, p in inv.manifests.items() if k not in expired}
    sizes, referenced = _read_references(store, list(remaining.values()), progress)
    unreferenced = {d: v for d, v in inv.payloads.items() if d not in referenced}
    doomed = [path for path, _, age in unreferenced.values() if age >= grace]
    doomed += [path for path, _, age in inv.temp if age >= grace]
    freed = sum(s for p, s, a in list(unreferenced.values()) + inv.temp if a >= grace)
    if not dry_run:
        _purge(store, inv, expired, grace, progress)
        if doomed:
            progress(f"  deleting {len(doomed)} unreferenced payloads ...")
        remove_paths(store, doomed, lambda done, total: progress(f"  deleted {done}/{total}"))
    return GcReport(
        flow=flow, url=url, dry_run=dry_run, checkpoints=len(remaining),
        retired_waiting=len(set(_retired(inv)) & remaining.keys()), purged=len(expired),
        logical_bytes=sum(sizes), payloads=len(inv.payloads),
        physical_bytes=sum(size for _, size, _ in inv.payloads.values()),
        freed_payloads=len(doomed), freed_bytes=freed,
        young_unreferenced=sum(1 for _, _, age in unreferenced.values() if age < grace),
    )


def _inventory(store: CheckpointStore, flow: str) -> _Inventory:
    base = store.flow_path(flow)
    try:
        infos = store.fs.find(base, detail=True)
    except FileNotFoundError:
        infos = {}
    now, inv = time.time(), _Inventory()
    for path, info in infos.items():
        rel = posixpath.relpath(path, base).split("/")
        size, age = int(info.get("size") or 0), now - mtime_of(info)
        if rel[-1].endswith(".tmp"):
            inv.temp.append((path, size, age))
        elif rel[0] == "objects" and len(rel) == 3 and rel[2] != EMPTY_DIGEST:
            inv.payloads[rel[2]] = (path, size, age)  # (the empty one is the write probe: kept)
        elif rel[0] == "steps" and len(rel) == 6 and rel[5].endswith(".json"):
            inv.manifests[("/".join(rel[1:5]), rel[5][:-5])] = path
        elif rel[0] == "steps" and len(rel) == 7 and rel[5] in (PINS, RETIRED):
            inv.markers[(rel[5], "/".join(rel[1:5]), rel[6])] = (path, age)
    return inv


def _retired(inv: _Inventory) -> dict:
    """(task folder, id) -> (tombstone path, age) of every retired checkpoint."""
    return {(task, i): v for (kind, task, i), v in inv.markers.items() if kind == RETIRED}


def _pinned(inv: _Inventory) -> set:
    return {(task, i) for (kind, task, i) in inv.markers if kind == PINS}


def _read_references(store: CheckpointStore, paths: list[str], progress: Progress) -> tuple[list[int], set[str]]:
    """Sizes of the checkpoints at ``paths`` and every payload hash they reference."""
    sizes, referenced = [], set()
    for start in range(0, len(paths), _READ_BATCH):
        batch = paths[start:start + _READ_BATCH]
        for path, data in store.fs.cat(batch, on_error="return").items():
            if isinstance(data, FileNotFoundError):
                continue  # purged meanwhile by its task's retention
            if isinstance(data, Exception):
                raise CheckpointError(f"gc stopped before deleting anything: cannot read {path} ({data}).")
            try:
                artifact = read_manifest(data, store.fs.unstrip_protocol(path), store.sealer, None)
            except CheckpointError as exc:
                raise CheckpointError(
                    f"gc stopped before deleting anything: {exc} Delete or restore that manifest, then run gc again."
                ) from None
            sizes.append(artifact.size)
            referenced.update(artifact.payload_digests())
        if len(paths) > _READ_BATCH:
            progress(f"  read {min(start + _READ_BATCH, len(paths))}/{len(paths)} manifests")
    return sizes, referenced


def _purge(store: CheckpointStore, inv: _Inventory, expired: set, grace: float, progress: Progress) -> None:
    """Manifests of expired checkpoints, then their tombstones; tombstones of pinned ones (a pin
    wins) and markers whose checkpoint is gone, once older than the grace period."""
    pinned = _pinned(inv)
    stale = [
        path for (kind, task, i), (path, age) in inv.markers.items()
        if (task, i) in expired
        or (kind == RETIRED and (task, i) in pinned)
        or ((task, i) not in inv.manifests and age >= grace)
    ]
    if expired:
        progress(f"  purging {len(expired)} retired checkpoints ...")
    remove_paths(store, [inv.manifests[k] for k in expired if k in inv.manifests])
    remove_paths(store, stale)
