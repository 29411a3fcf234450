"""The Lightning integration: saves at the Trainer's own save points, resumes exactly.

The flow test runs flows/train_lightning.py for real, SIGKILLed mid-epoch, against an
uninterrupted run.
"""
from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from metaflow.metaflow_current import Current
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import FLOWS
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.integrations.lightning import (
    MetaflowCheckpointCallback,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, _):
        return nn.functional.mse_loss(self.net(batch[0]).squeeze(-1), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_trainer_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(run_flow):
    """Killed at global step 20 (mid-epoch 2), the Trainer resumes from the end-of-epoch-1
    checkpoint that load() restored (Lightning's own files were deleted before the kill) and
    ends with every weight equal to an uninterrupted run's: optimizer, schedule, loop progress
    and random generators all continued."""
    from metaflow import Checkpoint, Run

    with ThreadPoolExecutor(2) as pool:
        crashed, clean = pool.map(
            lambda crash: run_flow(FLOWS / "train_lightning.py", "run", "--crash-at", crash), ["20", ""])
    assert "attempt 0: killed at global step 20" in crashed.output
    assert "attempt 1: resumed at global step 16" in crashed.output
    assert "Restored all states from the checkpoint at " in crashed.output
    assert "resumed" not in clean.output
    a = Run(f"LightningTrainFlow/{crashed.run_id}")["train"].task
    b = Run(f"LightningTrainFlow/{clean.run_id}")["train"].task
    assert a.current_attempt == 1 and b.current_attempt == 0
    model_a, model_b = a["final_model"].data, b["final_model"].data
    assert model_a.keys() == model_b.keys() and len(model_a) == 4
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert a["val_loss"].data == b["val_loss"].data
    saved = Checkpoint().list(task=a.pathspec)
    steps = sorted((cp.attempt, cp.metadata["global_step"]) for cp in saved)
    assert steps == [(0, 8), (0, 16), (1, 24), (1, 32), (1, 40), (1, 48)]
    assert all(cp.metadata["path"].endswith(f"step={cp.metadata['global_step']}.ckpt") for cp in saved)


def test_every_lightning_save_is_stored_and_the_next_attempt_resumes_without_lightnings_files(tmp_path, monkeypatch):
    """Each epoch's ModelCheckpoint save is written by Lightning and stored with its metadata;
    the wrapped IO reads any path (an earlier epoch, "best") from Lightning's own file, which
    holds the RNG states; in the next attempt, with those files gone, fit(ckpt_path=...) resumes
    from the dict load() restored (served once)."""
    flow = type("Flow", (), {})()
    cp = standalone(flow, str(tmp_path / "root"), TaskLocation("LightningFlow", "1", "train", "2"))
    monkeypatch.setattr(Current, "checkpoint", property(lambda _: cp))
    callback = MetaflowCheckpointCallback(flow)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         callbacks=[callback, ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1)])
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randn(16)), batch_size=8)
    trainer.fit(Model(), data)
    cp.wait()
    saved = sorted(cp.list(), key=lambda c: c.metadata["global_step"])
    assert [(c.metadata["epoch"], c.metadata["global_step"]) for c in saved] == [(0, 2), (1, 4)]
    first, last = (c.metadata["path"] for c in saved)
    assert last == flow.lightning_checkpoint.path and first.endswith("epoch=0-step=2.ckpt")
    io = trainer.strategy.checkpoint_io
    from_disk = io.load_checkpoint(first, weights_only=False)
    assert from_disk["global_step"] == 2 and "rng" in from_disk["callbacks"]["MetaflowCheckpointCallback"]
    shutil.rmtree(tmp_path / "ckpt")  # the next attempt, on another machine: only the store is left
    retry = type("Flow", (), {})()
    cp1 = standalone(retry, str(tmp_path / "root"), TaskLocation("LightningFlow", "1", "train", "2"), attempt=1)
    monkeypatch.setattr(Current, "checkpoint", property(lambda _: cp1))
    resumed = MetaflowCheckpointCallback(retry)
    assert resumed.resume_from() == last and cp1.loaded.key == saved[-1].key
    again = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                       callbacks=[resumed, ModelCheckpoint(dirpath=str(tmp_path / "ckpt2"))])
    again.fit(Model(), data, ckpt_path=last)
    cp1.wait()
    assert again.global_step == 6 and [c.metadata["global_step"] for c in cp1.list(attempt=1)] == [6]
    with pytest.raises(FileNotFoundError):  # the restored dict is served once, then only files
        again.strategy.checkpoint_io.load_checkpoint(last)
