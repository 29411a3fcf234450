"""Preemption: the train loop writes "<pid> <epoch>" to $PREEMPT_PROGRESS each epoch; the test
sends SIGTERM; on `current.checkpoint.preempted` the step saves (32 MB: a background save) and
returns; the retry resumes from that save and runs to epoch 20."""
import os
import time

import numpy as np
from metaflow import FlowSpec, checkpoint, current, retry, step


class PreemptFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @retry(times=1, minutes_between_retries=0)
    @checkpoint
    @step
    def train(self):
        loaded = current.checkpoint.load()
        if loaded is None:
            self.epoch, self.big = 0, np.zeros(4 << 20)
        self.resumed_from, self.resumed_at = (loaded.key, loaded.step) if loaded else (None, None)
        while self.epoch < 20 or current.retry_count == 0:  # attempt 0 runs until preempted
            if current.checkpoint.preempted:
                self.big[0] = self.epoch
                current.checkpoint.save(step=self.epoch, metadata={"preempted": True})
                return  # the task then ends as SIGTERM would; @retry resumes from this save
            self.epoch += 1
            if self.epoch > 2000:  # about 100 s: the test never sent SIGTERM
                raise RuntimeError("never preempted")
            if self.epoch % 3 == 0:
                current.checkpoint.save(step=self.epoch)
            with open(os.environ["PREEMPT_PROGRESS"] + ".tmp", "w") as f:
                f.write(f"{os.getpid()} {self.epoch}")
            os.replace(os.environ["PREEMPT_PROGRESS"] + ".tmp", os.environ["PREEMPT_PROGRESS"])
            time.sleep(0.05)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    PreemptFlow()
