"""Train a linear model with SGD on numpy, crashing twice, and finish with exactly the weights
of an uninterrupted run.

    python flows/train_numpy.py run                  # crashes at epochs 8 and 16, resumes twice
    python flows/train_numpy.py run --crash-at ""    # the same training, uninterrupted

Each crash is a SIGKILL of the task process (what a pre-empted spot instance looks like);
@retry starts a fresh process and current.checkpoint.load() puts every attribute back:
weights, epoch, loss history and the random generator's state.
"""
import os
import signal

import numpy as np
from metaflow import FlowSpec, Parameter, checkpoint, current, retry, step


class TrainFlow(FlowSpec):
    epochs = Parameter("epochs", default=24, help="Passes over the data.")
    crash_at = Parameter("crash-at", default="8,16", help="Epochs at which attempts 0, 1, ... are killed.")

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
            for batch in np.array_split(self.rng.permutation(len(self.y)), 16):
                grad = self.X[batch].T @ (self.X[batch] @ self.w - self.y[batch]) / len(batch)
                self.w = self.w - 0.05 * grad
            self.epoch += 1
            self.losses.append(float(np.mean((self.X @ self.w - self.y) ** 2)))
            current.checkpoint.save(metadata={"loss": self.losses[-1], "epoch": self.epoch})
            if current.retry_count < len(crashes) and self.epoch == crashes[current.retry_count]:
                print(f"attempt {current.retry_count}: killed at epoch {self.epoch}")
                os.kill(os.getpid(), signal.SIGKILL)
        self.next(self.end)

    @step
    def end(self):
        print(f"trained {self.epoch} epochs, final loss {self.losses[-1]:.6f}")
        print("weights", np.round(self.w, 4).tolist())


if __name__ == "__main__":
    TrainFlow()
