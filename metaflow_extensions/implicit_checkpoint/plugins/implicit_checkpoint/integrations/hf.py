"""Hugging Face ``Trainer`` checkpoints through ``current.checkpoint``.

At each of the Trainer's own saves (``save_strategy``/``save_steps``) the callback reads the
checkpoint folder the Trainer has just written (weights, optimizer, scheduler, RNG states,
``trainer_state.json`` with the global step) into one attribute of ``self`` and calls
``current.checkpoint.save()``. In the next attempt, ``resume_from(trainer)`` writes that folder
back and returns its path for ``trainer.train(resume_from_checkpoint=...)``: the Trainer then
resumes as it does from its own folder (it skips the batches already seen, restores the RNGs).

``*.safetensors`` files are kept as tensors (each stored under its own hash: weights that did
not change, frozen ones say, are not written again), every other file as its bytes.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from metaflow import current
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback

from ..exceptions import CheckpointSaveError

# The Trainer's own name for the folder of a save (transformers.trainer_utils.PREFIX_CHECKPOINT_DIR).
PREFIX = "checkpoint"


@dataclass
class TrainerFolder:
    """One Trainer checkpoint folder: ``files`` maps a relative path to its content (a dict of
    tensors and the header metadata for a ``.safetensors`` file, else a ``uint8`` tensor)."""

    global_step: int
    files: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: str, global_step: int) -> "TrainerFolder":
        files = {}
        for dirpath, _, names in os.walk(folder):
            for name in sorted(names):
                path = os.path.join(dirpath, name)
                files[os.path.relpath(path, folder)] = _read_file(path)
        return cls(global_step, files)

    def write(self, folder: str) -> str:
        """Write the files into ``folder`` (replacing what is there) and return it."""
        partial = f"{folder}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        for relpath, content in self.files.items():
            path = os.path.join(partial, relpath)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _write_file(path, content)
        shutil.rmtree(folder, ignore_errors=True)  # a folder the killed attempt may have left half-written
        os.rename(partial, folder)
        return folder


def _read_file(path: str) -> Any:
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            return {"metadata": f.metadata(), "tensors": {k: f.get_tensor(k) for k in f.keys()}}
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def _write_file(path: str, content: Any) -> None:
    if isinstance(content, dict):
        save_file(content["tensors"], path, metadata=content["metadata"])
    else:
        with open(path, "wb") as f:
            f.write(content.numpy().tobytes())


class MetaflowCheckpointCallback(TrainerCallback):
    """Saves the Trainer's checkpoints with ``current.checkpoint`` and resumes from them.

    Parameters
    ----------
    flow : FlowSpec
        The step's ``self``: the checkpoint folder becomes its attribute ``attribute``.
    attribute : str, default "hf_checkpoint"
        The attribute of ``self`` that holds the last checkpoint folder (a ``TrainerFolder``).

    Use it in a step decorated with ``@checkpoint``::

        callback = MetaflowCheckpointCallback(self)
        trainer = Trainer(model, args, train_dataset=data, callbacks=[callback])
        trainer.train(resume_from_checkpoint=callback.resume_from(trainer))

    Each save's metadata holds ``global_step``, ``epoch`` and the last logged ``loss`` (and
    ``eval_loss``) when there is one, for ``@checkpoint(keep=...)``.
    """

    def __init__(self, flow: Any, attribute: str = "hf_checkpoint"):
        self.flow = flow
        self.attribute = attribute

    def resume_from(self, trainer: Trainer) -> Optional[str]:
        """The folder to pass as ``resume_from_checkpoint``: the restored checkpoint written
        under ``trainer.args.output_dir``, or ``None`` when there is none (a fresh start).

        Calls ``current.checkpoint.load()`` first unless this attempt already loaded one.
        """
        if current.checkpoint.loaded is None:
            current.checkpoint.load()
        saved = getattr(self.flow, self.attribute, None)
        if saved is None:
            return None
        folder = os.path.join(trainer.args.output_dir, f"{PREFIX}-{saved.global_step}")
        os.makedirs(trainer.args.output_dir, exist_ok=True)
        return saved.write(folder)

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:  # another process of a distributed run writes the checkpoint
            return
        folder = os.path.join(args.output_dir, f"{PREFIX}-{state.global_step}")
        if not os.path.isdir(folder):
            raise CheckpointSaveError(
                f"Step {current.step_name!r}: the Trainer saved at global step {state.global_step} but its "
                f"checkpoint folder {folder} does not exist, so {self.attribute!r} cannot hold it. "
                "MetaflowCheckpointCallback reads the folder under args.output_dir (hyperparameter "
                "searches write elsewhere: save from each trial's own step instead).")
        setattr(self.flow, self.attribute, TrainerFolder.read(folder, state.global_step))
        # step=: every Trainer save is kept (saves of different steps never supersede each
        # other) and load(step=N) finds it
        current.checkpoint.save(metadata=_metadata(state), step=state.global_step)


def _metadata(state) -> dict:
    meta = {"global_step": state.global_step, "epoch": state.epoch}
    for entry in state.log_history:
        meta.update({k: entry[k] for k in ("loss", "eval_loss") if k in entry})
    return meta
