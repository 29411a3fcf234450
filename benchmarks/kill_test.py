"""SIGKILL a saving process at random instants, many times; after every kill, check what is left.

    python benchmarks/kill_test.py --kills 240 --backend both --fault-rate 0.05 --bad-inputs 600 --skew-minutes 30

Each round starts benchmarks/kill_child.py as the next attempt of one task: it resumes from the
newest intact checkpoint, checks it exactly, and saves in a loop while tests/transient_faults.py
injects transient faults that its retries must absorb. Half the rounds save as a step does:
queued, coalesced and written by the writer thread (batching.py), a save acknowledged once
``wait()`` returns it, so kills land with saves queued and one being written; the state
includes a long list that grows at every save (kept as runs: segments.py). Each round's clock is set off from the
others' by up to ``--skew-minutes`` either way (libfaketime), so wall clocks say nothing about
which attempt is newer. Meanwhile gc runs in a loop with the default grace; between rounds the
stored payloads are made two hours old (local disk: their mtimes), so gc finds old unreferenced
payloads (those of saves killed mid-way) that the next attempt, re-saving the same state, reuses.
The round kills it with SIGKILL at a random instant, or just as it starts writing a payload or a
manifest. Then, with a fresh reader and no faults:

- list() shows only loadable checkpoints: each new one is restored and checked exactly;
- nothing acknowledged is lost: every save the child saw return is listed;
- load() restores the newest complete checkpoint, exactly.

``--backend s3`` runs against moto's S3 server, started here on 127.0.0.1. After the kills,
benchmarks/bad_inputs.py throws hostile input at each backend. Prints a summary and one JSON line
(``RESULT {...}``); exits 1 if anything was lost, corrupt, or accepted that should not have been.
"""
from __future__ import annotations

import argparse
import atexit
import json
import mmap
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = HERE / "kill_child.py"
TASK = "KillFlow/1/train/1"
PHASES = {"R": "resuming", "S": "saving (serializing)", "P": "writing a payload", "M": "writing the manifest",
          "-": "between saves", "\0": "starting up"}


def start_s3() -> str:
    """moto's S3 server in its own process on a free loopback port, with a bucket; puts
    Metaflow's S3 settings in the environment (the children inherit them)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(server.terminate)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"METAFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "x",
                       "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"})
    import boto3
    from botocore.exceptions import EndpointConnectionError

    for _ in range(300):
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="kill-test")
            return "s3://kill-test/ckpt"
        except EndpointConnectionError:
            time.sleep(0.1)
    raise RuntimeError(f"moto's S3 server did not start on {endpoint}")


LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def skewed_env(rng: random.Random, minutes: float) -> dict:
    """The environment of a child whose wall clock is off by up to ``minutes`` either way."""
    if not minutes:
        return dict(os.environ)
    offset = round(rng.uniform(-minutes, minutes) * 60)
    return {**os.environ, "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": f"{offset:+d}",
            "FAKETIME_DONT_RESET": "1"}


class Round:
    """One child process, killed at a chosen moment."""

    def __init__(self, root: str, attempt: int, args, rng: random.Random, phase_file: str):
        Path(phase_file).write_bytes(bytes(16))
        self.batched = rng.random() < 0.5
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), root, "--task", TASK, "--attempt", str(attempt), "--phase-file",
             phase_file, "--fault-rate", str(args.fault_rate), "--seed", str(rng.randrange(2**31)),
             *(["--batched"] if self.batched else [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=skewed_env(rng, args.skew_minutes),
        )
        with open(phase_file, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), 16)
        self.target = rng.choice(["any", "P", "M"])
        self.rng = rng

    def kill(self) -> tuple[str, int, int, list[str], str]:
        """Kill at the target moment; returns phase at death, faults injected/retried, output."""
        self._wait(lambda p: p != "\0", 60)  # imports done: resuming
        if self.target == "any":
            time.sleep(self.rng.uniform(0, 1.2))
        else:  # a while into the save loop, then just as the next payload or manifest write starts
            self._wait(lambda p: p not in "\0R", 30)
            time.sleep(self.rng.uniform(0, 0.8))
            self._wait(lambda p: p == self.target, 5)
            time.sleep(self.rng.uniform(0, 0.002))
        self.proc.send_signal(signal.SIGKILL)
        stdout, stderr = self.proc.communicate()
        phase = chr(self.map[0])
        injected, retried = struct.unpack("<II", self.map[4:12])
        return phase, injected, retried, stdout.splitlines(), stderr

    def _wait(self, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready(chr(self.map[0])) and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.0003)


def verify(root: str, attempt: int, lines: list[str], newest_before, tally: Counter, problems: list):
    """The three invariants after a kill; returns the newest checkpoint now."""
    from kill_child import check
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import CheckpointError
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.recovery import restore_newest_intact
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.storage_options import storage_options
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import CheckpointStore

    cp, loc = Checkpointer(CheckpointStore(root, storage_options(root))), TaskLocation(*TASK.split("/"))
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        listed = cp.list(loc, attempt=attempt)
    problems += [f"attempt {attempt}: list() warned: {w.message}" for w in warned]
    for artifact in listed:
        tally["loads"] += 1
        try:
            problem = check(cp.restore(artifact), artifact.metadata)
        except CheckpointError as exc:
            problem = str(exc)
        if problem:
            tally["corrupt loads"] += 1
            problems.append(f"{artifact.key}: {problem}")
    acked = {line.split()[2] for line in lines if line.startswith("saved ")}
    keys = {a.key for a in listed}
    tally["saves acknowledged"] += len(acked)
    tally["checkpoints committed"] += len(keys)
    tally["committed but unacknowledged (killed after the manifest put)"] += len(keys - acked)
    tally["lost"] += len(acked - keys)
    problems += [f"{attempt}: acknowledged but not listed: {k}" for k in acked - keys]
    problems += [f"{attempt}: child: {line}" for line in lines if line.startswith("CORRUPT")]
    tally["corrupt loads"] += sum(line.startswith("CORRUPT") for line in lines)

    newest = listed[0] if listed else newest_before
    found = restore_newest_intact(cp, cp.resumable(loc, attempt + 1, other_runs=False, namespace=None))
    tally["loads"] += 1
    if (found and found[0].key) != (newest and newest.key) or (found and check(found[1], found[0].metadata)):
        tally["corrupt loads"] += 1
        problems.append(f"{attempt}: load() gave {found and found[0].key}, expected {newest and newest.key}")
    return newest


class Collector(threading.Thread):
    """gc with the default grace, over and over, while the rounds save."""

    def __init__(self, root: str, tally: Counter, problems: list):
        super().__init__(daemon=True)
        self.root, self.tally, self.problems, self.stop = root, tally, problems, threading.Event()

    def run(self) -> None:
        from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint import gc
        from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.storage_options import storage_options
        from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import CheckpointStore

        while not self.stop.is_set():
            try:
                report = gc.collect(CheckpointStore(self.root, storage_options(self.root)), TASK.split("/")[0])
            except Exception as exc:  # noqa: BLE001 (reported, and the run fails)
                self.problems.append(f"gc failed: {type(exc).__name__}: {exc}")
                return
            self.tally["gc passes during saves"] += 1
            self.tally["payloads gc deleted during saves"] += report.freed_payloads
            self.tally["payloads gc found reused meanwhile and kept"] += report.reused_meanwhile
            time.sleep(0.05)


def age_payloads(root: str) -> None:
    """Between rounds (no writer running): every payload two hours old, as after a long pause."""
    if "://" in root:
        return  # an object's time on the S3 server cannot be set from here
    old = time.time() - 7200
    for folder, _, files in os.walk(os.path.join(root, TASK.split("/")[0], "objects")):
        for name in files:
            os.utime(os.path.join(folder, name), (old, old))


def run_backend(root: str, kills: int, args, rng: random.Random, tally: Counter, problems: list) -> None:
    handle, phase_file = tempfile.mkstemp(prefix="kill-phase-")
    os.close(handle)
    newest = None
    collector = Collector(root, tally, problems)
    if args.gc:
        collector.start()
    for attempt in range(kills):
        if args.gc:
            age_payloads(root)
        victim = Round(root, attempt, args, rng, phase_file)
        phase, injected, retried, lines, stderr = victim.kill()
        tally["kills"] += 1
        tally["kills of batched writers"] += victim.batched
        tally[f"killed while {PHASES.get(phase, phase)}"] += 1
        tally["faults injected"] += injected
        tally["faults retried"] += retried
        if "Traceback" in stderr:
            problems.append(f"{attempt}: child failed: {stderr[-1500:]}")
        newest = verify(root, attempt, lines, newest, tally, problems)
    collector.stop.set()
    if args.gc:
        collector.join()  # before the hostile inputs, which set a signing secret for a while


def bad_inputs(root: str, count: int, seed: int, tally: Counter, problems: list) -> None:
    import bad_inputs as fuzz
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.storage_options import storage_options
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import CheckpointStore

    result = fuzz.run(Checkpointer(CheckpointStore(root, storage_options(root))), count, seed)
    tally["bad inputs tried"] += result["tried"]
    tally["bad inputs accepted"] += len(result["findings"])
    problems += result["findings"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=240, help="total, split evenly over the backends")
    parser.add_argument("--backend", choices=["local", "s3", "both"], default="both")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="share of storage calls that fail")
    parser.add_argument("--bad-inputs", type=int, default=600, help="total, split over the backends")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skew-minutes", type=float, default=30.0,
                        help="each round's clock is off by up to this much either way (0: no libfaketime)")
    parser.add_argument("--no-gc", dest="gc", action="store_false", help="no gc running during the saves")
    args = parser.parse_args()
    if args.skew_minutes and not LIBFAKETIME.exists():
        parser.error(f"--skew-minutes needs libfaketime ({LIBFAKETIME}; apt-get install faketime) or 0")
    sys.path.insert(0, str(HERE))
    backends = ["local", "s3"] if args.backend == "both" else [args.backend]
    rng, started = random.Random(args.seed), time.monotonic()
    # The S3 server first: Metaflow reads its S3 settings from the environment when first imported.
    roots = {b: start_s3() if b == "s3" else os.path.join(tempfile.mkdtemp(), "ckpt") for b in backends}
    totals, problems = Counter(), []
    for backend, root in roots.items():
        tally = Counter()
        run_backend(root, args.kills // len(backends), args, rng, tally, problems)
        bad_inputs(root + "-bad", args.bad_inputs // len(backends), args.seed, tally, problems)
        print(f"\n{backend} ({root})")
        for name, count in sorted(tally.items()):
            print(f"  {name:<64} {count:>7}")
        totals.update({f"{backend}: {k}": v for k, v in tally.items()})
        totals.update(tally)
    failed = totals["lost"] + totals["corrupt loads"] + totals["bad inputs accepted"] + len(problems)
    print("\n".join(f"PROBLEM {p}" for p in problems[:50]))
    print(f"\n{totals['kills']} kills survived, {totals['corrupt loads']} corrupt loads, {totals['lost']} lost, "
          f"{totals['faults injected']} faults injected / {totals['faults retried']} retried, "
          f"{totals['bad inputs tried']} bad inputs tried ({totals['bad inputs accepted']} accepted) "
          f"in {time.monotonic() - started:.0f} s")
    print("RESULT " + json.dumps({**totals, "problems": len(problems)}, sort_keys=True))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
