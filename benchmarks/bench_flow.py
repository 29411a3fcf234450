"""The save/load figures measured inside real Metaflow steps (fresh task processes)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
from metaflow import FlowSpec, checkpoint, current, step  # noqa: E402


class BenchFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.speed)

    @checkpoint
    @step
    def speed(self):
        scratch = Path(".").resolve()  # the run's folder: the same disk as .metaflow
        figures = measure.save_speed(current.checkpoint, self, scratch)
        figures.update(measure.incremental(current.checkpoint, self))
        figures.update(measure.load_speed(current.checkpoint, self, scratch, current.checkpoint.list()[0]))
        figures.update(measure.small_saves(current.checkpoint, self))
        measure.clear_state(self)  # not artifacts: Metaflow would store 200 MB more
        self.figures, self.speed_task = figures, current.task_id
        self.next(self.memory_save)

    @checkpoint
    @step
    def memory_save(self):
        self.figures = {**self.figures, **measure.memory_of_save(current.checkpoint, self)}
        self.saved_key = current.checkpoint.list()[0].key
        del self.w
        self.next(self.memory_load)

    @checkpoint
    @step
    def memory_load(self):
        figures, before = self.figures, measure.peak_rss()
        current.checkpoint.load(self.saved_key)  # restores memory_save's attributes, old figures too
        extra = max(0, measure.peak_rss() - before - self.w.nbytes) / measure.STATE
        self.figures = {**figures, "load_peak_extra_vs_state": extra}
        del self.w
        self.next(self.listing)

    @step
    def listing(self):
        """A fresh process lists the speed step's 1000 checkpoints through the client."""
        from metaflow import Checkpoint

        speed = f"{current.flow_name}/{current.run_id}/speed/{self.speed_task}"
        started = measure.time.perf_counter()
        listed = Checkpoint().list(task=speed)
        elapsed = (measure.time.perf_counter() - started) * 1000
        self.figures = {**self.figures, "cold_list_ms": elapsed, "cold_listed": len(listed)}
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    BenchFlow()
