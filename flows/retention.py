"""Retention: a training loop saves every epoch, and only what matters is kept.

    python flows/retention.py run                  # killed at epoch 12, resumed, 30 epochs
    python flows/retention.py checkpoint list      # the 6 checkpoints kept of 30 saved
    python flows/retention.py checkpoint gc        # reclaims deleted ones' storage (after 1 h)

@checkpoint(keep={"last": 2, "best": ("loss", "min", 2)}) keeps the newest 2 checkpoints and
the 2 with the lowest validation loss. Also kept: the epoch-12 checkpoint the second attempt
resumed from, and epoch 10, pinned with save(pin=True). The other 24 are deleted right after
the save that made them unnecessary; `checkpoint gc` later reclaims their payloads.
"""
import os
import signal

import numpy as np
from metaflow import FlowSpec, Parameter, checkpoint, current, retry, step


class RetentionFlow(FlowSpec):
    epochs = Parameter("epochs", default=30, help="Epochs to train.")
    crash_at = Parameter("crash-at", default=12, help="Epoch at which the first attempt is killed (0: never).")
    seed = Parameter("seed", default=0, help="Seed of the initial weights.")

    @retry(times=1, minutes_between_retries=0)
    @checkpoint(keep={"last": 2, "best": ("loss", "min", 2)})
    @step
    def start(self):
        if current.checkpoint.load():
            print(f"attempt {current.retry_count}: resumed at epoch {self.epoch}")
        else:
            self.epoch, self.w = 0, np.random.default_rng(self.seed).normal(size=(128, 128))  # 128 KiB
        while self.epoch < self.epochs:
            self.w = self.w * 0.99 + 0.01  # every epoch changes the weights: a new payload
            self.epoch += 1
            val_loss = round(abs(self.epoch - 18.4) / 10 + 0.1, 3)  # best at 18, then overfits
            # wait=True: this loop's epochs take microseconds, and saves that close together are
            # batched (the newest written); in a real loop save() alone writes every epoch's.
            current.checkpoint.save(metadata={"loss": val_loss, "epoch": self.epoch}, pin=self.epoch == 10, wait=True)
            if current.retry_count == 0 and self.epoch == self.crash_at:
                print(f"attempt 0: killed at epoch {self.epoch}")
                os.kill(os.getpid(), signal.SIGKILL)
        self.kept = sorted(c.metadata["epoch"] for c in current.checkpoint.list())
        self.next(self.end)

    @step
    def end(self):
        print(f"kept the checkpoints of epochs {self.kept}")


if __name__ == "__main__":
    RetentionFlow()
