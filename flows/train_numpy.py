"""Train a linear model with SGD on numpy, crashing twice, and finish with exactly the weights
of an uninterrupted run.

    python flows/train_numpy.py run                       # killed at epochs 8 and 16, resumes twice
    python flows/train_numpy.py run --crash-at ""         # the same training, uninterrupted
    python flows/train_numpy.py run --epoch-seconds 3     # slow enough to watch the card live

Each crash is a SIGKILL of the task process (what a pre-empted spot instance looks like);
@retry starts a fresh process and current.checkpoint.load() puts every attribute back:
weights, epoch, loss history and the random generator's state. The end step replays the
training without interruption and checks that the weights are the same, to the last bit.
"""
import os
import signal
import time

import numpy as np
from metaflow import FlowSpec, Parameter, checkpoint, current, retry, step


def sgd_epoch(X, y, w, rng):
    """One pass over the data in 16 shuffled mini-batches."""
    for batch in np.array_split(rng.permutation(len(y)), 16):
        w = w - 0.05 * X[batch].T @ (X[batch] @ w - y[batch]) / len(batch)
    return w


class TrainFlow(FlowSpec):
    epochs = Parameter("epochs", default=24, help="Passes over the data.")
    crash_at = Parameter("crash-at", default="8,16", help="Epochs at which attempts 0, 1, ... are killed.")
    epoch_seconds = Parameter("epoch-seconds", default=0.0, help="Sleep after each epoch, to watch the card live.")

    @step
    def start(self):
        rng = np.random.default_rng(7)
        self.X = rng.normal(size=(512, 8))
        self.y = self.X @ np.arange(1.0, 9.0) + rng.normal(scale=0.1, size=512)
        self.next(self.train)

    @retry(times=3, minutes_between_retries=0)
    @checkpoint(exclude=["X", "y"])
    @step
    def train(self):
        if current.checkpoint.load():
            print(f"attempt {current.retry_count}: resumed at epoch {self.epoch}")
        else:
            self.epoch, self.w, self.losses = 0, np.zeros(8), []
            self.rng = np.random.default_rng(0)
        crashes = [int(e) for e in self.crash_at.split(",") if e]
        while self.epoch < self.epochs:
            self.w = sgd_epoch(self.X, self.y, self.w, self.rng)
            self.epoch += 1
            self.losses.append(float(np.mean((self.X @ self.w - self.y) ** 2)))
            current.checkpoint.save(metadata={"loss": self.losses[-1], "epoch": self.epoch})
            time.sleep(self.epoch_seconds)
            if current.retry_count < len(crashes) and self.epoch == crashes[current.retry_count]:
                # The crash strikes in the next epoch, once this epoch's save is durable (save()
                # returns before it is written: a task killed that very instant loses it).
                current.checkpoint.wait()
                print(f"attempt {current.retry_count}: killed at epoch {self.epoch}")
                os.kill(os.getpid(), signal.SIGKILL)
        self.train_task = current.pathspec  # for the hint at the end (after the last save: not state)
        self.next(self.end)

    @step
    def end(self):
        rng, w = np.random.default_rng(0), np.zeros(8)
        for _ in range(self.epochs):  # the same training, never interrupted
            w = sgd_epoch(self.X, self.y, w, rng)
        print(f"trained {self.epoch} epochs, final loss {self.losses[-1]:.6f}")
        print("weights", np.round(self.w, 4).tolist())
        if not np.array_equal(self.w, w):
            raise AssertionError(f"the weights differ from an uninterrupted run's by up to {np.abs(self.w - w).max()}")
        print("same weights as an uninterrupted run, bit for bit (numpy.array_equal)")
        print("see the checkpoints: python flows/train_numpy.py card get train card.html  (or: checkpoint list train)")
        print(f"in a notebook: from metaflow import Checkpoint; Checkpoint().list(task={self.train_task!r})")


if __name__ == "__main__":
    TrainFlow()
