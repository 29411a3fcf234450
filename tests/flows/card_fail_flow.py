"""A step whose two attempts both save, then raise: the task fails, and its card must still
show every checkpoint, marked failed. Names and metadata carry markup that must show as text."""
from metaflow import FlowSpec, checkpoint, current, retry, step


class CardFailFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @retry(times=1, minutes_between_retries=0)
    @checkpoint
    @step
    def train(self):
        if not current.checkpoint.load():
            self.epoch = 0
        for _ in range(2):
            self.epoch += 1
            current.checkpoint.save(
                name="<img src=x onerror=alert(1)>",
                metadata={"note": "<script>alert(1)</script>", "loss": 1 / self.epoch},
                wait=True,  # both written (saves this close together would be batched)
            )
        raise RuntimeError(f"attempt {current.retry_count} gives up")
        self.next(self.end)  # never reached

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CardFailFlow()
