"""Save/load benchmarks: one command, one table. `python benchmarks/run_all.py`

Figure 7 (what @checkpoint adds to a task's duration) is `benchmarks/task_overhead.py`.

Each figure is measured twice: against the core (current.checkpoint over a plain object, no
Metaflow) and inside real Metaflow steps (fresh task processes); ratios are to numpy.save /
numpy.load of the same array to the same disk, measured in the same run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import measure  # noqa: E402

ROWS = [  # (figure, key, target, format)
    ("1. sync save / numpy.save (200 MB)", "sync_vs_numpy_save", "<= 1.2", "{:.2f}"),
    ("1. async save() stall / sync save", "async_stall_vs_sync", "<= 0.15", "{:.3f}"),
    ("1. hashing the 200 MB (xxh3-128) / sync save", "hash_share_of_sync", "", "{:.3f}"),
    ("2. unchanged save: written / state", "unchanged_written_vs_state", "<= 0.01", "{:.5f}"),
    ("2. 1 MB changed of 200 MB: MB written", "one_mb_changed_written_mb", "<= 2", "{:.2f}"),
    ("3. sync save peak extra RSS / state", "save_peak_extra_vs_state", "<= 0.25", "{:.3f}"),
    ("3. load peak extra RSS / state", "load_peak_extra_vs_state", "<= 0.25", "{:.3f}"),
    ("4. 20 small attrs: median ms/save", "small_median_ms", "<= 1", "{:.3f}"),
    ("4. 20 small attrs: p99 ms/save", "small_p99_ms", "", "{:.3f}"),
    ("4. objects written per small save", "objects_per_small_save", "", "{:.2f}"),
    ("5. list() of 1000 checkpoints, in the saving task: ms", "list_ms", "<= 50", "{:.1f}"),
    ("5. list() of 1000 checkpoints, fresh process: ms", "cold_list_ms", "<= 50", "{:.1f}"),
    ("5. inspect() of one: ms", "inspect_ms", "<= 5", "{:.2f}"),
    ("6. load / numpy.load (200 MB)", "load_vs_numpy_load", "<= 1.2", "{:.2f}"),
]


def core_figures(work: Path) -> dict:
    flow, api = measure.core_api(str(work / "core"))
    figures = measure.save_speed(api, flow, work)
    figures.update(measure.incremental(api, flow))
    figures.update(measure.load_speed(api, flow, work, api.list()[0]))
    flow, api = measure.core_api(str(work / "small"))
    figures.update(measure.small_saves(api, flow))
    for kind, root in (("save", "mem"), ("load", "mem"), ("list", "small")):
        out = subprocess.run([sys.executable, str(HERE / "measure.py"), kind, str(work / root)],
                             capture_output=True, text=True, check=True).stdout
        figures.update(json.loads(out))
    return figures


def _run(flow: str, *args: str, cwd: Path) -> float:
    env = {**os.environ, "USERNAME": os.environ.get("USERNAME", "bench")}
    started = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / flow), "--no-pylint", *args], cwd=cwd, env=env,
                   check=True, capture_output=True)
    return time.perf_counter() - started


def step_figures(work: Path) -> dict:
    home = work / "mf"
    (home / ".metaflow").mkdir(parents=True)
    _run("bench_flow.py", "run", cwd=home)
    from metaflow import Flow, namespace
    from metaflow.plugins.datastores.local_storage import LocalStorage

    os.chdir(home)
    LocalStorage.datastore_root = None
    namespace(None)
    return dict(Flow("BenchFlow").latest_run["end"].task["figures"].data)


def main() -> None:
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mfic-bench-", dir=os.environ.get("BENCH_DIR")))
    try:
        core = core_figures(work)
        in_step = step_figures(work)
    finally:
        os.chdir(HERE)
        shutil.rmtree(work, ignore_errors=True)
    print("| figure | target | core | in a Metaflow step |\n|---|---|---|---|")
    for label, key, target, fmt in ROWS:
        cells = [fmt.format(f[key]) if key in f else "n/a" for f in (core, in_step)]
        print(f"| {label} | {target} | {cells[0]} | {cells[1]} |")
    print(f"\nbaselines (core): numpy.save {core['numpy_save_s']:.3f} s, sync save "
          f"{core['sync_save_s']:.3f} s, numpy.load {core['numpy_load_s']:.3f} s; "
          f"total benchmark time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
