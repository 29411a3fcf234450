"""The Lightning integration: saves at the Trainer's own save points, resumes exactly.

The flow test runs flows/train_lightning.py for real, SIGKILLed mid-epoch, against an
uninterrupted run.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from conftest import FLOWS


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
