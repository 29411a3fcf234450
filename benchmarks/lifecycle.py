"""What retention and gc cost. `python benchmarks/lifecycle.py` (about half a minute)

1. A small save with @checkpoint(keep={"last": 3}) against the same save without retention,
   two tasks saving in turn 1000 times. Every retired checkpoint stays within the grace
   period here, so the task folder fills with 1000 manifests and tombstones: the cost must
   not grow with them (the median of the last 100 saves against all of them).
2. gc over a flow of 2000 checkpoints (half deleted) with 2000 payloads, against the two
   things it cannot avoid, measured on the same tree in the same run: listing it (fs.find)
   and deleting the same number of files with one fs.rm.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint import gc, marks  # noqa: E402
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone  # noqa: E402
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation  # noqa: E402
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import CheckpointStore  # noqa: E402

SAVES = 1000
CHECKPOINTS = 2000


def retention_figures(work: Path) -> dict:
    """The two tasks save in turn, so both see the same machine load."""
    apis = {}
    for label, keep in (("none", None), ("keep", {"last": 3})):
        flow = types.SimpleNamespace(epoch=0, loss=1.0, history=list(range(50)))
        apis[label] = flow, standalone(flow, str(work / label), TaskLocation("B", "1", "train", "1"),
                                       async_saves=False, keep=keep)
    times = {"none": [], "keep": []}
    for epoch in range(SAVES):
        for label, (flow, api) in apis.items():
            flow.epoch = epoch
            started = time.perf_counter()
            api.save(metadata={"loss": 1.0 / (epoch + 1)})
            times[label].append((time.perf_counter() - started) * 1000)
    plain, kept = times["none"], times["keep"]
    return {
        "save ms, no retention (median)": statistics.median(plain),
        "save ms, keep last 3 (median)": statistics.median(kept),
        "save ms, keep last 3 (last 100 saves, 900+ tombstones)": statistics.median(kept[-100:]),
        "ratio keep / none (median)": statistics.median(kept) / statistics.median(plain),
    }


def gc_figures(work: Path) -> dict:
    root = str(work / "gc")
    flow = types.SimpleNamespace()
    api = standalone(flow, root, TaskLocation("G", "1", "train", "1"), async_saves=False)
    for n in range(CHECKPOINTS):
        flow.w = np.full(1024, float(n))  # 8 KiB: a payload per checkpoint
        api.save()
    store = CheckpointStore(root)
    for artifact in api.list()[: CHECKPOINTS // 2]:
        marks.retire(store, artifact.key)
    started = time.perf_counter()
    store.fs.find(store.flow_path("G"), detail=True)
    listing = time.perf_counter() - started
    started = time.perf_counter()
    gc.collect(store, "G", grace=0, dry_run=True)
    dry = time.perf_counter() - started
    started = time.perf_counter()
    report = gc.collect(store, "G", grace=0)
    real = time.perf_counter() - started
    assert report.freed_payloads == CHECKPOINTS // 2
    scratch = work / "rm"
    scratch.mkdir()
    paths = [str(scratch / str(i)) for i in range(report.freed_payloads + report.purged * 2)]
    for path in paths:
        Path(path).write_bytes(b"x")
    started = time.perf_counter()
    store.fs.rm(paths)
    rm = time.perf_counter() - started
    return {
        "gc --dry-run s": dry, "fs.find of the tree s": listing, "ratio dry-run / listing": dry / listing,
        "gc s (purges 1000, deletes 1000 payloads)": real, "fs.rm of as many files s": rm,
        "ratio (gc - dry-run) / fs.rm": (real - dry) / rm,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        figures = {**retention_figures(Path(tmp)), **gc_figures(Path(tmp))}
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name.ljust(width)}  {value:8.3f}")


if __name__ == "__main__":
    main()
