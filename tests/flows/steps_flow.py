"""Step-indexed checkpoints: save(step=N) every epoch, a crash at epoch 4, then the retry goes
back to step 1 by number and records what it saw (tests/test_steps.py reads it)."""
import numpy as np
from metaflow import FlowSpec, checkpoint, current, retry, step

from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import CheckpointNotFound


class StepsFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @retry(times=1, minutes_between_retries=0)
    @checkpoint
    @step
    def train(self):
        if current.retry_count == 0:
            self.w = np.zeros(3)
            for epoch in range(6):
                self.epoch, self.w = epoch, self.w + 1
                current.checkpoint.save(step=epoch, metadata={"loss": 1.0 / (epoch + 1)})
                if epoch == 4:
                    raise RuntimeError("crash at epoch 4")
        self.resumed_at = current.checkpoint.load().step
        self.by_step = current.checkpoint.load(step=1).key
        self.epoch_at_step_1, self.w_at_step_1 = self.epoch, self.w.tolist()
        try:
            current.checkpoint.load(step=99)
        except CheckpointNotFound as exc:
            self.missing = str(exc)
        self.listed = [a.step for a in current.checkpoint.list(step=2)]
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    StepsFlow()
