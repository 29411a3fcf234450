"""Eight foreach branches checkpointing to one storage root at the same time; the odd ones are
SIGKILLed mid-way and resume in a second attempt. Every branch also saves one large array that is
identical across branches, so eight writers put the same payload concurrently."""
import os
import signal

import numpy as np
from metaflow import FlowSpec, checkpoint, current, retry, step


class Fanout8Flow(FlowSpec):
    @step
    def start(self):
        self.shards = list(range(8))
        self.next(self.work, foreach="shards")

    @retry(times=1, minutes_between_retries=0)
    @checkpoint
    @step
    def work(self):
        self.shard = self.input
        if not current.checkpoint.load():
            self.i, self.trail = 0, []
        self.shared = np.arange(300_000)
        while self.i < 6:
            self.i += 1
            self.trail.append([self.shard, self.i, current.retry_count])
            self.w = np.full(1000, self.shard * 100.0 + self.i)
            # wait=True: every save durable (saves milliseconds apart would be batched)
            current.checkpoint.save(metadata={"shard": self.shard, "i": self.i}, wait=True)
            if self.shard % 2 and self.i == 3 and current.retry_count == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        del self.shared
        self.next(self.join)

    @step
    def join(self, inputs):
        self.trails = {inp.shard: inp.trail for inp in inputs}
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    Fanout8Flow()
