"""Train a small PyTorch model, killed twice with SIGKILL, and finish with exactly the model and
optimizer state of an uninterrupted run.

    python flows/train_torch.py run                  # killed at epochs 2 and 4, resumes twice
    python flows/train_torch.py run --crash-at ""    # the same training, uninterrupted

The model class is defined in this file; the model, the AdamW optimizer, the LR scheduler
(stepped per batch) and the DataLoader's shuffling generator are separate attributes of self.
One checkpoint holds them as one object graph, so after load() the optimizer updates the
model's own parameters and the scheduler drives that optimizer, exactly as before the crash.
Dropout draws from torch's global generator: its state is kept on self too.
"""
import os
import signal

import torch
from metaflow import FlowSpec, Parameter, checkpoint, current, retry, step
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class MLP(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


class TorchTrainFlow(FlowSpec):
    epochs = Parameter("epochs", default=6, help="Passes over the data.")
    crash_at = Parameter("crash-at", default="2,4", help="Epochs at which attempts 0, 1, ... are killed.")

    @step
    def start(self):
        data = torch.Generator().manual_seed(7)
        self.X = torch.randn(1024, 16, generator=data)
        self.y = self.X @ torch.linspace(-1, 1, 16) + 0.1 * torch.randn(1024, generator=data)
        self.next(self.train)

    @retry(times=3, minutes_between_retries=0)
    @checkpoint(exclude=["X", "y"])
    @step
    def train(self):
        if current.checkpoint.load():
            torch.set_rng_state(self.torch_rng)
            self.shared_after_load = (
                self.opt.param_groups[0]["params"][0] is next(self.model.parameters())
                and self.sched.optimizer is self.opt
                and type(self.model) is MLP
            )
            print(f"attempt {current.retry_count}: resumed at epoch {self.epoch}, "
                  f"optimizer and scheduler share the model: {self.shared_after_load}")
        else:
            torch.manual_seed(0)
            self.model = MLP()
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3, weight_decay=0.01)
            batches = self.epochs * (len(self.y) // 32)
            self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=1e-2, total_steps=batches)
            self.shuffle = torch.Generator().manual_seed(1)
            self.epoch, self.losses = 0, []
        loader = DataLoader(TensorDataset(self.X, self.y), batch_size=32, shuffle=True, generator=self.shuffle)
        crashes = [int(e) for e in self.crash_at.split(",") if e]
        while self.epoch < self.epochs:
            self.model.train()
            for xb, yb in loader:
                loss = nn.functional.mse_loss(self.model(xb), yb)
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                self.sched.step()
            self.epoch += 1
            self.losses.append(loss.item())
            self.torch_rng = torch.get_rng_state()  # dropout's random state
            current.checkpoint.save(metadata={"loss": self.losses[-1], "epoch": self.epoch})
            if current.retry_count < len(crashes) and self.epoch == crashes[current.retry_count]:
                current.checkpoint.wait()  # the crash strikes once this epoch's save is durable
                print(f"attempt {current.retry_count}: killed at epoch {self.epoch}")
                os.kill(os.getpid(), signal.SIGKILL)
        # Plain tensors, readable in any process (the model's class lives in this file).
        self.final_model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.final_opt = self.opt.state_dict()
        self.next(self.end)

    @step
    def end(self):
        print(f"trained {self.epoch} epochs, final loss {self.losses[-1]:.6f}")


if __name__ == "__main__":
    TorchTrainFlow()
