"""Exercises the current.checkpoint API across three attempts; records what it saw as artifacts."""
import threading

import numpy as np
from metaflow import FlowSpec, checkpoint, current, retry, step


def make_counter(start):
    box = [start]

    def bump():
        box[0] += 1
        return box[0]

    return bump


class ApiFlow(FlowSpec):
    @step
    def start(self):
        self.undecorated_has_checkpoint = "checkpoint" in current
        self.upstream = {"seen": []}
        self.untouched = "never read by types"
        self.next(self.types, self.filters)

    @retry(times=2, minutes_between_retries=0)
    @checkpoint
    @step
    def types(self):
        class Local:
            def __init__(self, v):
                self.v = v

        attempt = current.retry_count
        is_loaded, latest = current.checkpoint.is_loaded, current.checkpoint.latest
        loaded = current.checkpoint.load()
        local_only = ("fn", "counter", "obj", "cls")  # Metaflow's own artifact pickler refuses these
        if attempt == 0:
            assert loaded is None and not is_loaded and latest is None
            self.n, self.x, self.s, self.none = 7, 2.5, "text", None
            self.tup, self.st = (1, "a"), {3, 4}
            self.arr = np.arange(12, dtype=np.float32).reshape(3, 4)
            self.big = np.zeros(100_000)  # large enough to be stored as its own payload
            self.rng = np.random.default_rng(5)
            self.fn = lambda v: v * 3
            self.counter = make_counter(10)
            self.obj, self.cls = Local(8), Local
            self.upstream["seen"].append("attempt0")  # an upstream artifact changed in place
            self.counter()
            self.expected_draw = float(np.random.default_rng(5).random())
            current.checkpoint.save(name="first", metadata={"step": 1})
            self.n = 8
            current.checkpoint.save(name="second", metadata={"step": 2}, latest=False)
            [delattr(self, k) for k in local_only]
            raise RuntimeError("crash in attempt 0")
        if attempt == 1:
            self.n += 100
            current.checkpoint.save(name="special", metadata={"attempt": 1})
            [delattr(self, k) for k in local_only]
            raise RuntimeError("crash in attempt 1")
        self.restored = {
            "n": self.n, "x": self.x, "s": self.s, "none": self.none, "tup": self.tup,
            "st": sorted(self.st), "arr": self.arr.tolist(), "arr_dtype": str(self.arr.dtype),
            "draw_matches": float(self.rng.random()) == self.expected_draw,
            "fn": self.fn(2), "counter": self.counter(), "obj": self.obj.v, "cls": self.cls(5).v,
            "upstream": self.upstream, "has_untouched": "untouched" in vars(self),
        }
        self.is_loaded_seen = is_loaded and latest.key == loaded.key
        self.listing = [(c.attempt, c.name, c.created_on, c.key) for c in current.checkpoint.list()]
        self.listing_attempt0 = [c.name for c in current.checkpoint.list(attempt=0)]
        self.listing_special = [c.attempt for c in current.checkpoint.list(name="special")]
        self.chain = [(c.attempt, c.name) for c in current.checkpoint.lineage()]
        self.loaded_key = loaded.key
        self.inspected = current.checkpoint.inspect(loaded)
        self.inspect_same = (
            current.checkpoint.inspect(loaded) == current.checkpoint.inspect(loaded.to_dict())
            == current.checkpoint.inspect(loaded.key) == loaded.implicit_manifest
        )
        [delattr(self, k) for k in local_only]
        self.next(self.join)

    @retry(times=1, minutes_between_retries=0)
    @checkpoint(include=["kept", "lock_free"])
    @step
    def filters(self):
        if current.checkpoint.load():
            self.filters_restored = sorted(k for k in ("kept", "lock_free", "dropped") if k in vars(self))
        else:
            self.kept, self.lock_free, self.dropped = 1, 2, 3
            self.lock = threading.Lock()  # not in include=, so never serialized
            current.checkpoint.save()
            raise RuntimeError("crash")
        self.next(self.join)

    @step
    def join(self, inputs):
        self.merge_artifacts(inputs, exclude=["lock", "upstream"])
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ApiFlow()
