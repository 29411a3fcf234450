"""The Hugging Face Trainer integration: saves at the Trainer's own save points, resumes exactly.

The flow test runs flows/finetune_hf.py for real (a tiny GPT-2 built from a config, nothing
downloaded), SIGKILLed mid-epoch, against an uninterrupted run.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from metaflow.metaflow_current import Current
from safetensors.torch import load_file

from conftest import FLOWS
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.exceptions import CheckpointSaveError
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.integrations.hf import (
    MetaflowCheckpointCallback,
    TrainerFolder,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import CheckpointStore

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(OFFLINE)


def _trained_folders(out: str) -> list[str]:
    """A tiny GPT-2 with frozen embeddings, trained 4 steps, saved by the Trainer at steps 2 and 4."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

    set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=1024, n_positions=16, n_embd=64, n_layer=1, n_head=2))
    model.transformer.wte.weight.requires_grad_(False)  # tied to lm_head: 256 KiB that never change
    ids = torch.randint(0, 1024, (16, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=out, max_steps=4, save_steps=2, per_device_train_batch_size=4,
                             use_cpu=True, report_to="none", disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=data).train()
    return [os.path.join(out, f"checkpoint-{n}") for n in (2, 4)]


def test_a_trainer_folder_round_trips_and_frozen_weights_are_not_written_again(tmp_path):
    """Read into tensors and bytes, stored, restored and written back, a Trainer folder holds the
    same files (tensors equal, other files byte for byte); the second save does not write the
    frozen embedding again."""
    first, second = _trained_folders(str(tmp_path / "out"))
    cp = Checkpointer(CheckpointStore(str(tmp_path / "root")))
    loc = TaskLocation("HFFlow", "1", "train", "2")
    a1 = cp.save(loc, 0, {"hf": TrainerFolder.read(first, 2)})
    a2 = cp.save(loc, 0, {"hf": TrainerFolder.read(second, 4)})
    frozen = 1024 * 64 * 4
    assert a1.written > frozen and a2.written < a1.written - frozen
    back = cp.restore(a2)["hf"].write(str(tmp_path / "again" / "checkpoint-4"))
    names = sorted(os.listdir(second))
    assert sorted(os.listdir(back)) == names and {"model.safetensors", "optimizer.pt", "scheduler.pt",
                                                   "rng_state.pth", "trainer_state.json"} <= set(names)
    for name in names:
        if name.endswith(".safetensors"):
            want, got = load_file(os.path.join(second, name)), load_file(os.path.join(back, name))
            assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        else:
            assert open(os.path.join(back, name), "rb").read() == open(os.path.join(second, name), "rb").read(), name


def test_a_trainer_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(run_flow):
    """Killed right after its save at global step 12 (mid-epoch; its output folder deleted), the
    Trainer resumes in a fresh output folder from what load() restored and ends with every weight equal to an
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


def test_a_save_whose_folder_is_not_under_output_dir_is_refused_naming_it(tmp_path, monkeypatch):
    """A Trainer save whose folder is not where the callback looks (a hyperparameter search
    writes elsewhere) is a CheckpointSaveError naming the folder; nothing is saved."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    flow = type("Flow", (), {})()
    cp = standalone(flow, str(tmp_path / "root"), TaskLocation("HFFlow", "1", "train", "2"))
    monkeypatch.setattr(Current, "checkpoint", property(lambda _: cp))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    folder = os.path.join(str(tmp_path / "out"), "checkpoint-4")
    with pytest.raises(CheckpointSaveError, match=f"global step 4 but its checkpoint folder {folder} does not exist"):
        MetaflowCheckpointCallback(flow).on_save(args, TrainerState(global_step=4), TrainerControl())
    assert not hasattr(flow, "hf_checkpoint") and cp.list() == []
