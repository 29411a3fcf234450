"""A foreach fan-out where every branch checkpoints on its own and one branch crashes.

    python flows/foreach_fanout.py run

Each shard sums squares in chunks and saves after every chunk. Shard 2 raises on its first
attempt half-way through; its retry resumes from that shard's own checkpoint (branches
never see each other's state), and the join merges the results with merge_artifacts.
"""
from metaflow import FlowSpec, Parameter, checkpoint, current, retry, step


class FanoutFlow(FlowSpec):
    shards = Parameter("shards", default=4)
    chunks = Parameter("chunks", default=10)
    crash_shard = Parameter("crash-shard", default=2, help="Shard whose first attempt fails; -1 for none.")

    @step
    def start(self):
        self.shard_ids = list(range(self.shards))
        self.next(self.work, foreach="shard_ids")

    @retry(times=2, minutes_between_retries=0)
    @checkpoint
    @step
    def work(self):
        self.shard = self.input
        if current.checkpoint.load():
            self.resumed_at = self.chunk
        else:
            self.chunk, self.total, self.resumed_at = 0, 0, None
        while self.chunk < self.chunks:
            base = (self.shard * self.chunks + self.chunk) * 100
            self.total += sum(i * i for i in range(base, base + 100))
            self.chunk += 1
            current.checkpoint.save(metadata={"chunk": self.chunk})
            if self.shard == self.crash_shard and current.retry_count == 0 and self.chunk == self.chunks // 2:
                raise RuntimeError(f"shard {self.shard}: simulated crash at chunk {self.chunk}")
        self.next(self.join)

    @step
    def join(self, inputs):
        self.totals = {i.shard: i.total for i in inputs}
        self.resumed = {i.shard: i.resumed_at for i in inputs}
        self.merge_artifacts(inputs, exclude=["shard", "chunk", "total", "resumed_at"])
        self.next(self.end)

    @step
    def end(self):
        print("totals", self.totals)
        print("resumed", self.resumed)
        print("shard_ids", self.shard_ids)


if __name__ == "__main__":
    FanoutFlow()
