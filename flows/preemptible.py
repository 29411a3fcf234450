"""A loop that stops cleanly when its machine is reclaimed: SIGTERM (what Kubernetes and spot
reclaims send) sets current.checkpoint.preempted; the loop saves and returns, the task ends as
SIGTERM would, and @retry resumes from that very save.

    python flows/preemptible.py run                    # "reclaimed" at epoch 7 (a SIGTERM it sends itself)
    python flows/preemptible.py run --reclaim-at 0     # never reclaimed

The end step checks the loss history against the same loop run without interruption.
"""
import os
import signal

import numpy as np
from metaflow import FlowSpec, Parameter, checkpoint, current, retry, step


class PreemptibleFlow(FlowSpec):
    epochs = Parameter("epochs", default=12)
    reclaim_at = Parameter("reclaim-at", default=7, help="Epoch at which attempt 0 gets SIGTERM (0: never).")

    @retry(times=1, minutes_between_retries=0)
    @checkpoint
    @step
    def start(self):
        if current.checkpoint.load():
            print(f"attempt {current.retry_count}: resumed at epoch {self.epoch} (saved after the SIGTERM)")
        else:
            self.epoch, self.w, self.losses = 0, np.zeros(4), []
        while self.epoch < self.epochs:
            if current.checkpoint.preempted:  # SIGTERM, or Metaflow's spot-termination notice
                current.checkpoint.save(step=self.epoch, metadata={"preempted": True})
                return  # flushed, then the task ends as SIGTERM would: @retry resumes from here
            self.epoch += 1
            self.w = self.w * 0.9 + 1.0
            self.losses.append(float(np.abs(self.w - 10).sum()))
            if self.epoch % 5 == 0:
                current.checkpoint.save(step=self.epoch)
            if current.retry_count == 0 and self.epoch == self.reclaim_at:
                print(f"attempt 0: reclaimed (SIGTERM) during epoch {self.epoch}")
                os.kill(os.getpid(), signal.SIGTERM)  # what a spot reclaim sends
        self.next(self.end)

    @step
    def end(self):
        w, losses = np.zeros(4), []
        for _ in range(self.epochs):
            w = w * 0.9 + 1.0
            losses.append(float(np.abs(w - 10).sum()))
        assert self.losses == losses, "the history differs from an uninterrupted run's"
        print(f"{len(self.losses)} epochs, the same history as an uninterrupted run")


if __name__ == "__main__":
    PreemptibleFlow()
