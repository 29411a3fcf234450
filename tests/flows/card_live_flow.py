"""The step tests/test_card_browser.py watches live. Attempt 0 saves three checkpoints and
raises; attempt 1 loads the last, then saves one checkpoint per `save` line it reads from the
FIFO named by $CARD_GATE, and finishes at `done` (or when the writer goes away)."""
import os

from metaflow import FlowSpec, checkpoint, current, retry, step


class CardLiveFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @retry(times=1, minutes_between_retries=0)
    @checkpoint
    @step
    def train(self):
        if not current.checkpoint.load():
            self.epoch = 0
            for _ in range(3):
                self.save_epoch()
            raise RuntimeError("attempt 0 is lost")
        with open(os.environ["CARD_GATE"]) as gate:
            for command in gate:
                if command.strip() == "done":
                    break
                self.save_epoch()
        self.next(self.end)

    def save_epoch(self):
        self.epoch += 1
        current.checkpoint.save(
            name=f"epoch-{self.epoch}", metadata={"loss": 1 / self.epoch, "note": "<script>alert(1)</script>"}
        )

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CardLiveFlow()
