"""The Hugging Face Trainer integration: saves at the Trainer's own save points, resumes exactly.

The flow test runs flows/finetune_hf.py for real (a tiny GPT-2 built from a config, nothing
downloaded), SIGKILLed mid-epoch, against an uninterrupted run.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from conftest import FLOWS

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_a_trainer_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(run_flow):
    """Killed right after its save at global step 12 (mid-epoch), the Trainer resumes in a fresh
    output folder from what load() restored and ends with every weight equal to an
    uninterrupted run's, and with the same logged losses."""
    from metaflow import Run

    with ThreadPoolExecutor(2) as pool:
        crashed, clean = pool.map(
            lambda crash: run_flow(FLOWS / "finetune_hf.py", "run", "--crash-at", crash, env=OFFLINE), ["12", ""])
    assert "attempt 0: killed at global step 12" in crashed.output
    assert "attempt 1: resumed at global step 12" in crashed.output
    assert "resumed" not in clean.output
    a = Run(f"FinetuneHFFlow/{crashed.run_id}")["train"].task
    b = Run(f"FinetuneHFFlow/{clean.run_id}")["train"].task
    assert a.current_attempt == 1 and b.current_attempt == 0
    model_a, model_b = a["final_model"].data, b["final_model"].data
    assert model_a.keys() == model_b.keys() and len(model_a) > 10
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert a["losses"].data == b["losses"].data and len(a["losses"].data) == 6
    assert a["hf_checkpoint"].data.global_step == 24
