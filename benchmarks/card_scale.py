"""What the checkpoint card costs a task with 10,000 checkpoints.

    python benchmarks/card_scale.py [--checkpoints 10000] [--root DIR]

Saves N small checkpoints (each with a ``loss``) into one task on a local root, each the parent
of the next, and the last loaded-from chain as long as the task. Then measures what the card's
final render does when the task ends, in a fresh process as Metaflow runs it: open the store,
list the task, build the view (rows, plot, lineage) and render the page. Prints the seconds,
its CPU seconds, the page's size and one JSON line (``RESULT {...}``). The target: at most 2 s
at 10,000.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import types

TARGET_SECONDS = 2.0
RENDER = """
import sys, time
started = time.perf_counter()
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.card import CardRequest, build_view, render_page
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import open_store
imported = time.perf_counter()
request = CardRequest(pathspec="CardScaleFlow/1/train/1", position="root", attempt=1, root=sys.argv[1],
                      load_policy="fresh", loaded=sys.argv[2])
html = render_page(build_view(Checkpointer(open_store(sys.argv[1])), request), "token")
done = time.perf_counter()
print(f"{imported - started:.3f} {done - imported:.3f} {len(html.encode())}")
"""


def populate(root: str, n: int) -> str:
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation

    flow = types.SimpleNamespace(step=0)
    api = standalone(flow, root, TaskLocation("CardScaleFlow", "1", "train", "1"), async_saves=False)
    last = None
    for i in range(n):
        flow.step = i
        last = api.save(metadata={"loss": 1.0 / (1 + i), "epoch": i})
    return last.key


def _children_cpu() -> float:
    """CPU seconds used by finished child processes: on a busy machine (the figure to trust
    there) wall time also counts waiting for a core."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints", type=int, default=10_000)
    parser.add_argument("--root", default=None)
    args = parser.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="card-scale-") + "/ckpt"
    started = time.perf_counter()
    loaded = populate(root, args.checkpoints)
    print(f"saved {args.checkpoints} checkpoints in {time.perf_counter() - started:.1f} s")
    total, cpu = time.perf_counter(), _children_cpu()
    out = subprocess.run([sys.executable, "-c", RENDER, root, loaded], capture_output=True, text=True, check=True)
    total, cpu = time.perf_counter() - total, _children_cpu() - cpu
    imports, render, size = out.stdout.split()
    result = {"checkpoints": args.checkpoints, "task_end_seconds": round(total, 3), "cpu_seconds": round(cpu, 3),
              "imports_seconds": float(imports), "render_seconds": float(render), "html_bytes": int(size),
              "target_seconds": TARGET_SECONDS, "within_target": total <= TARGET_SECONDS}
    print(f"card at task end: {total:.2f} s wall, {cpu:.2f} s CPU (imports {float(imports):.2f} s, list+view+render "
          f"{float(render):.2f} s), page {int(size) / 1e6:.2f} MB; target <= {TARGET_SECONDS} s: "
          f"{'met' if result['within_target'] else 'MISSED'}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
