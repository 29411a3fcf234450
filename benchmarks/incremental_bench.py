"""Growing state and small saves: the figures of issue 10, side by side in one run.

    python benchmarks/incremental_bench.py            # about 2 minutes

Every figure goes through ``current.checkpoint`` over a plain object (the code a step runs),
on a local disk unless it says S3 (moto's server on loopback, started here). Bytes are counted
on storage (every file or object under the root, manifests included), so nothing a save wrote
escapes the count. The 200 MB ratios are measured as benchmarks/run_all.py does: against
numpy.save / numpy.load of the same array to the same disk, both sides writing new files.
"""
from __future__ import annotations

import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import measure  # noqa: E402

ITEMS = 3000


def standalone(flow, root: str, async_saves: bool = True):
    """current.checkpoint over ``flow`` (imported late: Metaflow reads the S3 endpoint, set by
    start_s3(), when first imported)."""
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint import api
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation

    return api.standalone(flow, root, TaskLocation("BenchFlow", "1", "grow", "1"), async_saves=async_saves)


def stored_bytes(root: str) -> int:
    if "://" in root:
        import fsspec

        fs, path = fsspec.core.url_to_fs(root)
        return sum(info["size"] for info in fs.find(path, detail=True).values())
    return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())


def appends(root: str, batched: bool) -> dict:
    """3,000 saves, one ~250 B result appended to a list before each (an LLM batch job)."""
    rng = random.Random(10)
    flow = types.SimpleNamespace(results=[], done=0)
    api = standalone(flow, root, async_saves=batched)
    times = []
    for i in range(ITEMS):
        flow.results.append(f"item {i}: " + rng.randbytes(120).hex())
        flow.done = i + 1
        started = time.perf_counter()
        api.save(metadata={"done": i + 1})
        times.append(time.perf_counter() - started)
    api.wait()
    final = sum(len(r) for r in flow.results)
    first, last = statistics.median(times[:100]), statistics.median(times[-100:])
    return {"bytes_vs_state": stored_bytes(root) / final, "last_vs_first": last / first,
            "first_ms": first * 1000, "last_ms": last * 1000, "written": len(api.list())}


def one_float(root: str) -> float:
    flow = types.SimpleNamespace(w=measure.big_array(3))
    api = standalone(flow, root)
    api.save(wait=True)
    flow.w[12_345_678] = -1.0
    return api.save(wait=True).written


def string_append(root: str) -> float:
    rng = random.Random(11)
    flow = types.SimpleNamespace(transcript=rng.randbytes((10 << 20) + 4321).hex())  # 20 MiB, not chunk-aligned
    api = standalone(flow, root)
    api.save(wait=True)
    flow.transcript += rng.randbytes(512).hex()
    return api.save(wait=True).written


class Latent:
    """A real filesystem whose every storage call first waits ``seconds`` (a far-away region)."""

    CALLS = {"cat_file", "pipe_file", "exists", "info", "ls", "find", "open", "mv", "rm_file", "makedirs"}

    def __init__(self, fs, seconds: float):
        self.fs, self.seconds = fs, seconds

    def __getattr__(self, name: str):
        real = getattr(self.fs, name)
        if name not in self.CALLS:
            return real

        def slow(*args, **kwargs):
            time.sleep(self.seconds)
            return real(*args, **kwargs)

        return slow


def small_on_s3(root: str, latency: float, count: int = 300) -> dict:
    """20 small attributes, one changed per save: the time spent in save()."""
    flow = types.SimpleNamespace(**{f"a{j}": {"j": j, "values": list(range(j))} for j in range(20)})
    api = standalone(flow, root)
    if latency:
        api._checkpointer.store.fs = Latent(api._checkpointer.store.fs, latency)
    api.save(wait=True)  # the first save checks the bucket: not what a loop pays
    times = []
    for i in range(count):
        flow.a0 = {"step": i}
        started = time.perf_counter()
        api.save()
        times.append(time.perf_counter() - started)
        time.sleep(0.002)  # some work between saves
    api.wait()
    times.sort()
    return {"median_ms": statistics.median(times) * 1000, "p99_ms": times[int(len(times) * 0.99)] * 1000,
            "written": len(api.list())}


def numpy_ratios(work: Path) -> dict:
    flow, api = measure.core_api(str(work / "np"))
    figures = measure.save_speed(api, flow, work)
    figures.update(measure.load_speed(api, flow, work, api.list()[0]))
    return figures


def main() -> None:
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mfic-grow-", dir=os.environ.get("BENCH_DIR")))
    from kill_test import start_s3

    bucket = start_s3()
    try:
        tight = appends(str(work / "tight"), batched=True)
        every = appends(str(work / "every"), batched=False)
        floats = one_float(str(work / "float"))
        text = string_append(str(work / "text"))
        s3 = small_on_s3(bucket + "/plain", 0.0)
        slow = small_on_s3(bucket + "/slow", 0.05)
        ratios = numpy_ratios(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        ("3,000 appends, tight loop (batched): bytes stored / final state", "<= 5", f"{tight['bytes_vs_state']:.2f}"),
        ("  same, every save written (async_saves=False, or saves slower than storage)", "", f"{every['bytes_vs_state']:.2f}"),
        ("same loop: median save() of the last 100 / first 100", "<= 2",
         f"{tight['last_vs_first']:.2f} ({tight['first_ms']:.3f} -> {tight['last_ms']:.3f} ms)"),
        ("  same, every save written in the step", "", f"{every['last_vs_first']:.2f} ({every['first_ms']:.3f} -> {every['last_ms']:.3f} ms)"),
        ("200 MB array, 1 float changed: MiB written", "<= 4", f"{floats / (1 << 20):.2f}"),
        ("20 MiB string, 1 KiB appended: MiB written", "<= 4", f"{text / (1 << 20):.2f}"),
        ("small save on S3 (moto): median / p99 ms in save()", "<= 1 / <= 10", f"{s3['median_ms']:.3f} / {s3['p99_ms']:.3f}"),
        ("same with 50 ms per request: median / p99 ms in save()", "<= 1", f"{slow['median_ms']:.3f} / {slow['p99_ms']:.3f}"),
        ("200 MB numpy sync save / numpy.save", "<= 1.2", f"{ratios['sync_vs_numpy_save']:.2f}"),
        ("200 MB load / numpy.load", "<= 1.2", f"{ratios['load_vs_numpy_load']:.2f}"),
    ]
    print("| figure | goal | measured |\n|---|---|---|")
    for label, goal, value in rows:
        print(f"| {label} | {goal} | {value} |")
    print(f"\ncheckpoints written: tight loop {tight['written']} of {ITEMS} saves, every-save {every['written']}; "
          f"S3 {s3['written']} and {slow['written']} of 300; numpy.save {ratios['numpy_save_s']:.3f} s, "
          f"sync save {ratios['sync_save_s']:.3f} s; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
