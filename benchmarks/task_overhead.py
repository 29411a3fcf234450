"""What @checkpoint adds to a step that saves nothing: real Metaflow runs of one flow whose
middle step is undecorated (the baseline) or decorated, measured in the same session.

    python benchmarks/task_overhead.py [--runs 7]

Prints the fastest and the median wall time of `python flow.py run` for each variant, the
difference and ratio against the baseline, and whether the difference is within the target
(0.3 s), judged on the fastest runs: on a shared machine they are the least disturbed. For
reference it also measures the step saving one checkpoint, with and without the checkpoint
card (a step that saves renders the card when its task ends).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 0.3
FLOW = '''
from metaflow import FlowSpec, checkpoint, current, step

class OverheadFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.work)

    {decorator}
    @step
    def work(self):
        self.total = sum(range(1000))
        {save}
        self.next(self.end)

    @step
    def end(self):
        pass

if __name__ == "__main__":
    OverheadFlow()
'''
VARIANTS = {
    "undecorated (baseline)": ("", ""),
    "@checkpoint, saves nothing": ("@checkpoint", ""),
    "@checkpoint(card=False), one save": ("@checkpoint(card=False)", "current.checkpoint.save()"),
    "@checkpoint, one save (card)": ("@checkpoint", "current.checkpoint.save()"),
}


def run_seconds(flow: Path, home: Path) -> float:
    env = {**os.environ, "USERNAME": "bench", "METAFLOW_DEFAULT_DATASTORE": "local", "METAFLOW_DEFAULT_METADATA": "local"}
    started = time.perf_counter()
    subprocess.run([sys.executable, str(flow), "--no-pylint", "run"], cwd=home, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per variant (interleaved)")
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / ".metaflow").mkdir()
        flows = {}
        for name, (decorator, save) in VARIANTS.items():
            flows[name] = home / f"flow_{len(flows)}.py"
            flows[name].write_text(FLOW.format(decorator=decorator, save=save))
        for flow in flows.values():
            run_seconds(flow, home)  # warm up: first runs compile and create the datastore
        times: dict[str, list[float]] = {name: [] for name in flows}
        for _ in range(runs):
            for name, flow in flows.items():
                times[name].append(run_seconds(flow, home))
    print(f"{runs} runs each of `python flow.py run` (3 tasks), {os.cpu_count()} CPUs")
    for label, stat in (("fastest", min), ("median", statistics.median)):
        base = stat(times["undecorated (baseline)"])
        print(f"{label}:")
        for name, t in times.items():
            print(f"  {name:36s} {stat(t):6.3f} s   diff {stat(t) - base:+6.3f} s   ratio {stat(t) / base:5.3f}")
    overhead = min(times["@checkpoint, saves nothing"]) - min(times["undecorated (baseline)"])
    verdict = "within" if overhead <= TARGET_SECONDS else "OVER"
    print(f"saves nothing (fastest runs): {overhead:+.3f} s, {verdict} the {TARGET_SECONDS} s target")


if __name__ == "__main__":
    main()
