"""The save/load figures, measured the same way against the core and inside a Metaflow step.

Every figure is a ratio to a baseline measured in the same run on the same disk (numpy.save /
numpy.load to a folder beside the checkpoint root), or an absolute count where the issue asks
for one. ``api`` is ``current.checkpoint`` (in a step) or a CurrentCheckpoint over a plain
object (core); ``flow`` is the object whose attributes are the state.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np

MB = 1 << 20
STATE = 200 * 1000 * 1000  # 200 MB of float32
REPEATS = 7


def timed(fn) -> float:
    os.sync()  # start every write with no dirty pages queued, so runs compare like with like
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def timed_pair(i: int, ours, theirs) -> tuple[float, float]:
    """Time ``ours`` and ``theirs`` back to back, the first one alternating with ``i``."""
    if i % 2:
        theirs_s = timed(theirs)
        return timed(ours), theirs_s
    ours_s = timed(ours)
    return ours_s, timed(theirs)


def _median(values) -> float:
    return statistics.median(values)


def clear_state(flow) -> None:
    """Drop the state attributes (in a step: so Metaflow does not also store them)."""
    for name in [n for n in vars(flow) if not n.startswith("_") and n != "name"]:
        delattr(flow, name)


def big_array(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(STATE // 4, dtype=np.float32)


def save_speed(api, flow, scratch: Path) -> dict:
    """Figure 1: synchronous save / numpy.save, asynchronous stall / synchronous save.
    Each save holds new values, so each writes 200 MB. Both sides write new files and keep
    them until the end (neither reuses page-cache pages the other just freed), and which side
    goes first alternates."""
    np_times, sync_times, stalls, kept = [], [], [], []
    for i in range(REPEATS):
        flow.w = big_array(i)
        kept.append(scratch / f"{uuid.uuid4().hex}.npy")
        ours, theirs = timed_pair(i, lambda: api.save(wait=True), lambda: np.save(kept[-1], flow.w))
        sync_times.append(ours)
        np_times.append(theirs)
        flow.w = big_array(200 + i)
        stalls.append(timed(api.save))
        api.wait()
    for path in kept:
        path.unlink()
    sync = _median(sync_times)
    pairs = list(zip(np_times, sync_times, stalls))  # measured back to back: compare within each
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import content_hash

    hashing = _median(timed(lambda: content_hash([flow.w])) for _ in range(REPEATS))
    return {
        "hash_share_of_sync": hashing / sync,
        "numpy_save_s": _median(np_times),
        "sync_save_s": sync,
        "sync_vs_numpy_save": _median(s / n for n, s, _ in pairs),
        "async_stall_s": _median(stalls),
        "async_stall_vs_sync": _median(a / s for _, s, a in pairs),
    }


def incremental(api, flow) -> dict:
    """Figure 2: bytes written by an unchanged save, and by one changed 1 MB attribute."""
    flow.w = big_array(7)
    flow.small = np.zeros(MB // 8)
    api.save(wait=True)
    unchanged = api.save(wait=True)
    flow.small = np.ones(MB // 8)
    changed = api.save(wait=True)
    return {
        "unchanged_written_vs_state": unchanged.written / STATE,
        "one_mb_changed_written_mb": changed.written / MB,
    }


def load_speed(api, flow, scratch: Path, reference) -> dict:
    """Figure 6: load() of the 200 MB state / numpy.load of the same array from the same disk."""
    target = scratch / "baseline.npy"
    np.save(target, flow.w)
    np_times, load_times = [], []
    for _ in range(REPEATS):  # interleaved, compared pair by pair
        np_times.append(timed(lambda: np.load(target)))
        load_times.append(timed(lambda: api.load(reference)))
    target.unlink()
    return {"load_vs_numpy_load": _median(l / n for n, l in zip(np_times, load_times)),
            "numpy_load_s": _median(np_times), "load_s": _median(load_times)}


def small_saves(api, flow, count: int = 1000) -> dict:
    """Figures 4 and 5: 20 small attributes saved `count` times; list() and inspect() after."""
    clear_state(flow)
    times = []
    for i in range(count):
        for j in range(20):
            setattr(flow, f"a{j}", {"step": i, "values": [j, i, j * i]} if j % 2 else i + j)
        times.append(timed(api.save))
    newest = api.list()
    list_times = [timed(api.list) for _ in range(REPEATS)]
    inspect_times = [timed(lambda: api.inspect(newest[0])) for _ in range(REPEATS)]
    times.sort()
    return {
        "small_median_ms": _median(times) * 1000,
        "small_p99_ms": times[int(len(times) * 0.99)] * 1000,
        # written counts the manifest too: more than the manifest means a payload object as well
        "objects_per_small_save": sum(1 + (a.written > len(_read(a.url))) for a in newest) / len(newest),
        "listed": len(newest),
        "list_ms": _median(list_times) * 1000,
        "inspect_ms": _median(inspect_times) * 1000,
    }


def core_api(root: str, attempt: int = 0):
    """A plain object and current.checkpoint for it: the core, without Metaflow."""
    import types

    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation

    flow = types.SimpleNamespace()
    return flow, standalone(flow, root, TaskLocation("BenchFlow", "1", "core", "1"), attempt)


def cold_list(api) -> dict:
    """Figure 5 in a fresh process: list() parsing every manifest, nothing cached."""
    started = time.perf_counter()
    listed = api.list()
    return {"cold_list_ms": (time.perf_counter() - started) * 1000, "cold_listed": len(listed)}


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_of_save(api, flow) -> dict:
    """Figure 3a, in a fresh process: peak memory a synchronous save adds above the state."""
    flow.w = big_array(11)
    before = peak_rss()
    api.save(wait=True)
    return {"save_peak_extra_vs_state": max(0, peak_rss() - before) / STATE}


def memory_of_load(api, flow) -> dict:
    """Figure 3b, in a fresh process: peak memory of load() above the restored state."""
    before = peak_rss()
    api.load()
    return {"load_peak_extra_vs_state": max(0, peak_rss() - before - flow.w.nbytes) / STATE}


if __name__ == "__main__" and len(sys.argv) == 3:
    # Fresh-process figures against the core: python measure.py save|load|list ROOT
    import json

    kind, root = sys.argv[1], sys.argv[2]
    flow, api = core_api(root, attempt=0 if kind == "save" else 1)
    measures = {"save": memory_of_save, "load": memory_of_load, "list": lambda api, flow: cold_list(api)}
    result = measures[kind](api, flow)
    print(json.dumps(result))
    os._exit(0)


def _read(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()
