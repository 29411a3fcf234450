"""PyTorch figures, measured inside real Metaflow steps: `python benchmarks/torch_bench.py`

A ~200 MB model (four nn.Linear(4096, 3072)) against torch.save / torch.load of its
state_dict() to the same disk, in the same step. Every timed write goes to a new file (both
sides keep theirs until the end, so neither rewrites pages the other just freed), the order of
the two sides alternates, and os.sync() runs before each timing; ratios are medians of pairs
measured back to back. Memory figures run in fresh task processes, with the kernel's peak-RSS
counter reset just before the call (/proc/self/clear_refs).
"""
from __future__ import annotations

import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from metaflow import FlowSpec, checkpoint, current, step
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402  (timed_pair: the same pairing as the numpy figures)

REPEATS = 5
ROWS = [  # (figure, key, goal, format)
    ("sync save() / torch.save", "sync_vs_torch_save", "<= 1.2", "{:.2f}"),
    ("async save() stall / sync save()", "async_stall_vs_sync", "<= 0.15", "{:.3f}"),
    ("peak extra RSS during save / state", "save_peak_extra_vs_state", "<= 0.25", "{:.3f}"),
    ("load() / torch.load", "load_vs_torch_load", "<= 1.2", "{:.2f}"),
    ("peak extra RSS during load, beyond the state / state", "load_peak_extra_vs_state", "<= 0.25", "{:.3f}"),
    ("unchanged save after load(): bytes written / state", "unchanged_after_load_vs_state", "<= 0.01", "{:.5f}"),
    ("one of four layers changed: bytes written / that layer", "one_layer_written_vs_layer", "<= 1.1", "{:.3f}"),
]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(4096, 3072) for _ in range(4)))


def state_bytes(m: nn.Module) -> int:
    return sum(t.nbytes for t in m.state_dict().values())


def perturb(m: nn.Module) -> None:
    """New values in every tensor, so the next save has 200 MB to write."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_during(fn) -> int:
    """Peak resident memory reached while ``fn`` runs, above the memory in use before it."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident size
    before = rss()
    fn()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return max(0, hwm - before)


class TorchBenchFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.speed)

    @checkpoint
    @step
    def speed(self):
        scratch = Path(".").resolve() / "baseline"  # beside .metaflow: the same disk
        scratch.mkdir(exist_ok=True)
        self.model = model()
        size = state_bytes(self.model)
        torch_save, sync, stall = [], [], []
        for i in range(REPEATS):
            target = scratch / f"{uuid.uuid4().hex}.pt"
            perturb(self.model)
            ours, theirs = measure.timed_pair(i, lambda: current.checkpoint.save(wait=True),
                                              lambda: torch.save(self.model.state_dict(), target))
            sync.append(ours)
            torch_save.append(theirs)
            perturb(self.model)
            stall.append(measure.timed(current.checkpoint.save))
            current.checkpoint.wait()
        newest = current.checkpoint.list()[0]
        torch_load, load = [], []
        for i in range(REPEATS):
            ours, theirs = measure.timed_pair(i, lambda: current.checkpoint.load(newest), lambda: torch.load(target))
            load.append(ours)
            torch_load.append(theirs)
        unchanged = current.checkpoint.save(wait=True)  # right after the load above
        with torch.no_grad():
            self.model[2].weight.mul_(0.5)
            self.model[2].bias.mul_(0.5)
        layer = self.model[2].weight.nbytes + self.model[2].bias.nbytes
        one_layer = current.checkpoint.save(wait=True)
        self.figures = {
            "state_mb": size / 1e6,
            "torch_save_s": statistics.median(torch_save), "sync_save_s": statistics.median(sync),
            "sync_vs_torch_save": statistics.median(s / t for s, t in zip(sync, torch_save)),
            "async_stall_vs_sync": statistics.median(a / s for a, s in zip(stall, sync)),
            "torch_load_s": statistics.median(torch_load), "load_s": statistics.median(load),
            "load_vs_torch_load": statistics.median(o / t for o, t in zip(load, torch_load)),
            "unchanged_after_load_vs_state": unchanged.written / size,
            "one_layer_written_vs_layer": one_layer.written / layer,
        }
        self.saved_key = newest.key
        del self.model  # not an artifact: Metaflow would store 200 MB more
        self.next(self.memory_save)

    @checkpoint
    @step
    def memory_save(self):
        self.model = model()
        size = state_bytes(self.model)
        extra = peak_during(lambda: current.checkpoint.save(wait=True))
        self.figures = {**self.figures, "save_peak_extra_vs_state": extra / size}
        del self.model
        self.next(self.memory_load)

    @checkpoint
    @step
    def memory_load(self):
        size = state_bytes(model())  # the size only; this model is freed before measuring
        figures = self.figures
        extra = peak_during(lambda: current.checkpoint.load(self.saved_key))
        self.figures = {**figures, "load_peak_extra_vs_state": max(0, extra - size) / size}
        del self.model
        self.next(self.end)

    @step
    def end(self):
        pass


def main() -> None:
    started = time.perf_counter()
    home = Path(tempfile.mkdtemp(prefix="mfic-torch-bench-", dir=os.environ.get("BENCH_DIR")))
    (home / ".metaflow").mkdir()
    env = {**os.environ, "USERNAME": os.environ.get("USERNAME", "bench"), "METAFLOW_DEFAULT_DATASTORE": "local",
           "METAFLOW_DEFAULT_METADATA": "local"}
    subprocess.run([sys.executable, __file__, "--no-pylint", "run"], cwd=home, env=env, check=True,
                   capture_output=True)
    from metaflow import Flow, namespace
    from metaflow.plugins.datastores.local_storage import LocalStorage

    os.chdir(home)
    LocalStorage.datastore_root = None
    namespace(None)
    figures = Flow("TorchBenchFlow").latest_run["end"].task["figures"].data
    subprocess.run(["rm", "-rf", str(home)], check=False)
    print("| figure (a %.0f MB torch model, in a Metaflow step) | goal | measured |\n|---|---|---|" % figures["state_mb"])
    for label, key, goal, fmt in ROWS:
        print(f"| {label} | {goal} | {fmt.format(figures[key])} |")
    print(f"\nbaselines: torch.save {figures['torch_save_s']:.3f} s, sync save() {figures['sync_save_s']:.3f} s, "
          f"torch.load {figures['torch_load_s']:.3f} s, load() {figures['load_s']:.3f} s; "
          f"total benchmark time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        TorchBenchFlow()
    else:
        main()
