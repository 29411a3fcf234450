"""Two @parallel nodes train on their own data shards; node 1 is killed at epoch 4, and on the
retry each node resumes its own state.

    PATH="$PWD/.venv/bin:$PATH" python flows/train_parallel.py run               # node 1 killed at epoch 4
    PATH="$PWD/.venv/bin:$PATH" python flows/train_parallel.py run --crash-at -1 # uninterrupted

(Metaflow starts the other nodes of a local @parallel step with the `python` on PATH, so that
one must have Metaflow and this package.) Each node's checkpoints are kept under its own task
and position (its node index). When node 1 dies, Metaflow fails the whole step and @retry runs
every node again: node 0 resumes from its last epoch, node 1 from epoch 4, each from its own
save. The join checks every node's weights against the same training replayed without
interruption, to the last bit.
"""
import os
import signal

import numpy as np
from metaflow import FlowSpec, Parameter, checkpoint, current, parallel, retry, step


def shard(node: int):
    """Node `node`'s own data: 256 rows of a linear problem."""
    rng = np.random.default_rng(100 + node)
    X = rng.normal(size=(256, 8))
    return X, X @ np.arange(1.0, 9.0) + rng.normal(scale=0.1, size=256)


def sgd_epoch(X, y, w, rng):
    for batch in np.array_split(rng.permutation(len(y)), 8):
        w = w - 0.05 * X[batch].T @ (X[batch] @ w - y[batch]) / len(batch)
    return w


class ParallelTrainFlow(FlowSpec):
    epochs = Parameter("epochs", default=8, help="Passes over each node's shard.")
    crash_at = Parameter("crash-at", default=4, help="Epoch at which node 1's first attempt is killed (-1: never).")

    @step
    def start(self):
        self.next(self.train, num_parallel=2)

    @retry(times=1, minutes_between_retries=0)
    @checkpoint
    @parallel
    @step
    def train(self):
        self.node = current.parallel.node_index
        X, y = shard(self.node)
        loaded = current.checkpoint.load()  # this node's own newest checkpoint
        if loaded is None:
            self.epoch, self.w, self.rng = 0, np.zeros(8), np.random.default_rng(self.node)
        self.resumed_at = loaded.step if loaded else None
        print(f"node {self.node} attempt {current.retry_count}: starting at epoch {self.epoch}")
        while self.epoch < self.epochs:
            self.w = sgd_epoch(X, y, self.w, self.rng)
            self.epoch += 1
            loss = float(np.mean((X @ self.w - y) ** 2))
            current.checkpoint.save(step=self.epoch, metadata={"loss": loss, "node": self.node})
            if self.node == 1 and current.retry_count == 0 and self.epoch == self.crash_at:
                current.checkpoint.wait()  # the crash strikes once this epoch's save is durable
                print(f"node 1: killed at epoch {self.epoch}")
                os.kill(os.getpid(), signal.SIGKILL)
        self.next(self.join)

    @step
    def join(self, inputs):
        self.resumed = {i.node: i.resumed_at for i in inputs}
        for i in inputs:
            X, y = shard(i.node)
            rng, w = np.random.default_rng(i.node), np.zeros(8)
            for _ in range(self.epochs):  # the same training, never interrupted
                w = sgd_epoch(X, y, w, rng)
            if not np.array_equal(i.w, w):
                raise AssertionError(f"node {i.node}'s weights differ from an uninterrupted run's")
        self.weights = {i.node: i.w.tolist() for i in inputs}
        print(f"resumed at epochs {self.resumed}; every node has the weights of an uninterrupted run")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ParallelTrainFlow()
