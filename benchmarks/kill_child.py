"""A writer that resumes, checks, and saves until it is killed: the victim of kill_test.py.

    python benchmarks/kill_child.py ROOT --task Flow/run/step/task --attempt 3 [--saves N]

It resumes from the newest intact checkpoint of the earlier attempts (exactly what load() does),
checks that the restored state is exactly what was saved, then saves states i+1, i+2, ... until
killed or ``--saves`` are done. State i of writer ``tag`` is a pure function of (tag, i), plus the
history of (tag, i) along its lineage, so any reader can check any checkpoint exactly.

Output, one line each: ``resumed <key> <i>`` or ``fresh``, then ``saved <i> <key>`` once a save
has returned (the checkpoint is durable), or ``CORRUPT <why>``. With ``--phase-file`` it records
what it is doing in a shared file the killer reads: byte 0 is the phase (R resuming, S saving,
P writing a payload, M writing the manifest, - between saves), then the faults injected and
retried so far (two little-endian uint32).
"""
from __future__ import annotations

import argparse
import mmap
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # transient_faults.py

from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer  # noqa: E402
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation  # noqa: E402
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.recovery import (  # noqa: E402
    restore_newest_intact,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.retry import RetryPolicy  # noqa: E402
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.storage_options import (  # noqa: E402
    storage_options,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import CheckpointStore  # noqa: E402

CONST = np.arange(150_000)  # never changes: written once, then only referenced
RETRY = RetryPolicy(deadline=30.0, base=0.01, cap=0.2)


def state(tag: str, i: int, history: list, log: list | None = None) -> dict:
    """State i of writer ``tag``; payload sizes vary from 8 KB to 1.6 MB so writes take time.
    ``log`` (one line per entry of the history) is a long list kept as runs (segments.py): the
    writer appends to one list, as a batch job would."""
    rng = np.random.default_rng(i)  # w depends on i alone: a retry re-saving state i reuses its payload
    history = history + [[tag, i]]
    return {"tag": tag, "i": i, "w": rng.normal(size=1000 + (i * 7919) % 200_000),
            "const": CONST, "history": history, "log": [line(*h) for h in history] if log is None else log}


def line(tag: str, i: int) -> str:
    return f"{tag}:{i}:" + "x" * (i % 200)


def check(values: dict, metadata: dict) -> str:
    """'' if ``values`` is exactly the state its metadata names, else what differs."""
    tag, i = metadata.get("tag"), metadata.get("i")
    if values.get("tag") != tag or values.get("i") != i:
        return f"holds {values.get('tag')}/{values.get('i')}, manifest says {tag}/{i}"
    history = values.get("history") or []
    expected = state(tag, i, history[:-1])
    if not np.array_equal(values["w"], expected["w"]) or not np.array_equal(values["const"], CONST):
        return f"arrays of {tag}/{i} differ from what was saved"
    if history[-1] != [tag, i] or [h[1] for h in history] != list(range(i + 1)):
        return f"history of {tag}/{i} is not a chain ending in it: {history[-3:]}"
    if values.get("log") != [line(*h) for h in history]:
        return f"log of {tag}/{i} does not match its history"
    return ""


class Phases:
    """The shared phase file, and hooks on the store that keep it current."""

    def __init__(self, path: str | None):
        self.map = None
        if path:
            with open(path, "r+b") as f:
                self.map = mmap.mmap(f.fileno(), 16)

    def set(self, phase: str) -> None:
        if self.map is not None:
            self.map[0] = ord(phase)

    def counts(self, injected: int, retried: int) -> None:
        if self.map is not None:
            self.map[4:12] = struct.pack("<II", injected, retried)

    def hook(self, store: CheckpointStore, faults) -> None:
        for name, phase in (("put_object", "P"), ("put_manifest", "M")):
            real = getattr(store, name)

            def phased(*args, _real=real, _phase=phase):
                self.set(_phase)
                try:
                    return _real(*args)
                finally:
                    self.set("S")
                    self.counts(faults.injected if faults else 0, store.retried)

            setattr(store, name, phased)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--task", required=True, help="Flow/run/step/task")
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--tag", help="writer name (default a<attempt>)")
    parser.add_argument("--saves", type=int, default=0, help="stop after this many (0: until killed)")
    parser.add_argument("--phase-file")
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batched", action="store_true",
                        help="save as a step does (batched in a writer thread), acknowledging what wait() returns")
    args = parser.parse_args()
    tag = args.tag or f"a{args.attempt}"
    phases = Phases(args.phase_file)
    phases.set("R")
    store = CheckpointStore(args.root, storage_options(args.root), retry=RETRY)
    faults = None
    if args.fault_rate:
        from transient_faults import FaultyFS

        store.fs = faults = FaultyFS(store.fs, rate=args.fault_rate, seed=args.seed)
    phases.hook(store, faults)
    cp, loc = Checkpointer(store), TaskLocation(*args.task.split("/"))

    found = restore_newest_intact(cp, cp.resumable(loc, args.attempt, other_runs=False, namespace=None))
    history, i = [], 0
    if found is not None:
        artifact, values = found
        problem = check(values, artifact.metadata)
        if problem:
            print(f"CORRUPT {artifact.key}: {problem}", flush=True)
            return 3
        history, i = values["history"], values["i"] + 1
        log = values["log"]
        print(f"resumed {artifact.key} {values['i']}", flush=True)
    else:
        log = []
        print("fresh", flush=True)
    if args.batched:
        return batched(cp, loc, args, tag, i, history, log)
    for n in range(args.saves or sys.maxsize):
        phases.set("S")
        log.append(line(tag, i + n))
        artifact = cp.save(loc, args.attempt, state(tag, i + n, history, log), metadata={"tag": tag, "i": i + n})
        phases.set("-")
        history = history + [[tag, i + n]]
        print(f"saved {i + n} {artifact.key}", flush=True)
    return 0


def batched(cp: Checkpointer, loc: TaskLocation, args, tag: str, i: int, history: list, log: list) -> int:
    """Save like ``current.checkpoint.save()`` in a step: queued, coalesced, written by the
    writer thread; a save is acknowledged once a ``wait()`` (every fourth save) returns it."""
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import CurrentCheckpoint, StepContext

    step = type("Step", (), {})()
    current = CurrentCheckpoint(cp, StepContext(
        flow=step, location=loc, attempt=args.attempt, load_policy="none", include=None, exclude=None,
        reserved=frozenset(), namespace=None, on_first_use=lambda: None, on_loaded=lambda artifact: None))
    for n in range(args.saves or sys.maxsize):
        log.append(line(tag, i + n))
        vars(step).update(state(tag, i + n, history, log))
        current.save(metadata={"tag": tag, "i": i + n})
        history = history + [[tag, i + n]]
        if n % 4 == 3:
            for artifact in current.wait():
                print(f"saved {artifact.metadata['i']} {artifact.key}", flush=True)
    current.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
