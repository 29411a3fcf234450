"""Train a small model with Lightning, killed twice with SIGKILL mid-epoch, and finish with exactly
the weights of an uninterrupted run.

    python flows/train_lightning.py run                  # killed at global steps 20 and 36, resumes twice
    python flows/train_lightning.py run --crash-at ""    # the same training, uninterrupted

ModelCheckpoint saves at the end of every epoch (8 steps); MetaflowCheckpointCallback stores each
of those checkpoints with current.checkpoint, and the next attempt resumes the Trainer from the one
load() restored (trainer.fit(ckpt_path=...)), in a fresh checkpoint folder: the optimizer, the
per-step LR schedule, the loop's progress and the random generators (shuffling, dropout) continue
where the last save left them. Each kill deletes Lightning's own checkpoint files first: the
resume needs only what current.checkpoint stored. Needs `pip install "metaflow-implicit-checkpoint[lightning]"`.
"""
import os
import shutil
import signal
import tempfile

import torch
from metaflow import FlowSpec, Parameter, checkpoint, current, retry, step
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def regressor():
    """A LightningModule: an MLP with dropout, AdamW and a per-step OneCycle schedule. Built in a
    function so that only the train step pays for importing Lightning (seconds)."""
    import lightning.pytorch as pl

    class Regressor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1))

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x).squeeze(-1), y))

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)
            steps = self.trainer.estimated_stepping_batches
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Regressor()


def kill_at(global_step: int):
    """A callback that SIGKILLs the attempt when the Trainer reaches ``global_step``, deleting
    Lightning's checkpoint files first: the next attempt may run on another machine."""
    import lightning.pytorch as pl

    class KillAt(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == global_step:
                shutil.rmtree(trainer.checkpoint_callback.dirpath)
                current.checkpoint.wait()  # the crash strikes once the last save is durable
                print(f"attempt {current.retry_count}: killed at global step {global_step}")
                os.kill(os.getpid(), signal.SIGKILL)

    return KillAt()


class LightningTrainFlow(FlowSpec):
    epochs = Parameter("epochs", default=6, help="Passes over the data (8 steps each).")
    crash_at = Parameter("crash-at", default="20,36", help="Global steps at which attempts 0, 1, ... are killed.")

    @step
    def start(self):
        data = torch.Generator().manual_seed(7)
        self.X = torch.randn(320, 16, generator=data)
        self.y = self.X @ torch.linspace(-1, 1, 16) + 0.1 * torch.randn(320, generator=data)
        self.next(self.train)

    @retry(times=3, minutes_between_retries=0)
    @checkpoint(exclude=["X", "y"])
    @step
    def train(self):
        import lightning.pytorch as pl
        from lightning.pytorch.callbacks import ModelCheckpoint

        from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.integrations.lightning import (
            MetaflowCheckpointCallback,
        )

        pl.seed_everything(0)
        model = regressor()
        train = DataLoader(TensorDataset(self.X[:256], self.y[:256]), batch_size=32, shuffle=True)
        val = DataLoader(TensorDataset(self.X[256:], self.y[256:]), batch_size=32)
        callback = MetaflowCheckpointCallback(self)
        callbacks = [callback, ModelCheckpoint(dirpath=tempfile.mkdtemp())]  # a fresh disk each attempt
        crashes = [int(s) for s in self.crash_at.split(",") if s]
        if current.retry_count < len(crashes):
            callbacks.append(kill_at(crashes[current.retry_count]))
        trainer = pl.Trainer(
            max_epochs=self.epochs, accelerator="cpu", devices=1, deterministic=True, callbacks=callbacks,
            logger=False, enable_progress_bar=False, enable_model_summary=False,
        )
        resume = callback.resume_from()
        if resume:
            step_ = self.lightning_checkpoint.checkpoint["global_step"]
            print(f"attempt {current.retry_count}: resumed at global step {step_}")
        trainer.fit(model, train, val, ckpt_path=resume)
        self.final_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.val_loss = trainer.callback_metrics["val_loss"].item()
        self.next(self.end)

    @step
    def end(self):
        print(f"trained {self.epochs} epochs, validation loss {self.val_loss:.6f}")


if __name__ == "__main__":
    LightningTrainFlow()
