"""A run that fails outright, then `resume` continues from the failed task's checkpoint.

    FAIL_AT=12 python flows/resume_eager.py run      # "the API went down" at item 12: run fails
    python flows/resume_eager.py resume              # continues at item 12, not at item 0

There is no @retry here: the run fails. `resume` re-runs the failed step as a new task of a
new run; load_policy="eager" finds the newest checkpoint of the same step (and foreach
position) in an earlier run of your namespace, so the finished items are not paid for twice.
"""
import os

from metaflow import FlowSpec, Parameter, checkpoint, current, step


def expensive_call(item):
    """Stands in for an LLM or web request: deterministic, so runs can be compared."""
    return f"summary-{item}-{item * item % 97}"


class ResumeFlow(FlowSpec):
    items = Parameter("items", default=20)

    @step
    def start(self):
        self.todo = list(range(self.items))
        self.next(self.process)

    @checkpoint(load_policy="eager")
    @step
    def process(self):
        loaded = current.checkpoint.load()
        if not loaded:
            self.results = {}
        self.started_at = len(self.results)
        self.loaded_from = loaded.pathspec if loaded else None
        fail_at = int(os.environ.get("FAIL_AT", "-1"))
        for item in self.todo[len(self.results):]:
            if item == fail_at:
                raise RuntimeError(f"service unavailable at item {item}")
            self.results[item] = expensive_call(item)
            current.checkpoint.save(metadata={"done": len(self.results)})
        self.next(self.end)

    @step
    def end(self):
        print(f"{len(self.results)} results; this run's task started at item {self.started_at}")


if __name__ == "__main__":
    ResumeFlow()
