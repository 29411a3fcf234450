"""Lightning ``Trainer`` checkpoints through ``current.checkpoint``.

The callback wraps the Trainer's ``CheckpointIO``: every checkpoint the Trainer saves (through
``ModelCheckpoint``, ``trainer.save_checkpoint`` or any other of its own save points) is still
written where Lightning writes it, and its dict (weights, optimizer and scheduler states, loop
progress with the global step, callback and datamodule states, hyperparameters) becomes one
attribute of ``self`` saved with ``current.checkpoint.save()``. In the next attempt,
``resume_from()`` gives the path to pass as ``trainer.fit(..., ckpt_path=...)``, and the wrapped
IO answers the Trainer's read of that path with the dict ``load()`` restored: nothing needs to
be left on the disk of the failed attempt.

Lightning keeps no random generator state in its checkpoints; the callback adds it (torch, numpy,
Python and CUDA generators, as its own callback state) and sets it back when the Trainer restores
the checkpoint, so shuffling and dropout continue as in an uninterrupted run.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback
from metaflow import current


@dataclass
class LightningCheckpoint:
    """One checkpoint the Trainer saved: the path it asked for and the checkpoint dict."""

    path: str
    checkpoint: dict


class _MetaflowIO(CheckpointIO):
    """Writes through to the Trainer's own ``CheckpointIO`` and saves with ``current.checkpoint``."""

    def __init__(self, inner: CheckpointIO, owner: "MetaflowCheckpointCallback"):
        self.inner = inner
        self.owner = owner

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        self.owner.save(LightningCheckpoint(str(path), checkpoint))

    def load_checkpoint(
        self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None,
    ) -> dict:
        resumed = self.owner.take_resumed(str(path))
        if resumed is not None:
            return resumed
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)  # a ModelCheckpoint's top-k; @checkpoint(keep=...) rules ours

    def teardown(self) -> None:
        self.inner.teardown()


class MetaflowCheckpointCallback(Callback):
    """Saves the Trainer's checkpoints with ``current.checkpoint`` and resumes from them.

    Parameters
    ----------
    flow : FlowSpec
        The step's ``self``: the last checkpoint becomes its attribute ``attribute``.
    attribute : str, default "lightning_checkpoint"
        The attribute of ``self`` that holds it (a ``LightningCheckpoint``).

    Use it in a step decorated with ``@checkpoint``, beside the ``ModelCheckpoint`` that decides
    when to save::

        callback = MetaflowCheckpointCallback(self)
        trainer = L.Trainer(max_epochs=10, callbacks=[callback, ModelCheckpoint(dirpath=...)])
        trainer.fit(model, train_loader, ckpt_path=callback.resume_from())

    Each save's metadata holds ``epoch``, ``global_step`` and ``path``.
    """

    def __init__(self, flow: Any, attribute: str = "lightning_checkpoint"):
        self.flow = flow
        self.attribute = attribute
        self._resumed: Optional[LightningCheckpoint] = None

    def resume_from(self) -> Optional[str]:
        """The ``ckpt_path`` to resume from: the path of the checkpoint ``load()`` restored, or
        ``None`` when there is none (a fresh start). Calls ``current.checkpoint.load()`` first
        unless this attempt already loaded one."""
        if current.checkpoint.loaded is None:
            current.checkpoint.load()
        self._resumed = getattr(self.flow, self.attribute, None)
        return self._resumed.path if self._resumed else None

    def take_resumed(self, path: str) -> Optional[dict]:
        """The restored dict, once, if ``path`` is its path. Once: the Trainer trains on its
        tensors in place (as on those of a file it reads), so it is no checkpoint afterwards."""
        if self._resumed is None or self._resumed.path != path:
            return None
        resumed, self._resumed = self._resumed, None
        return resumed.checkpoint

    def save(self, saved: LightningCheckpoint) -> None:
        setattr(self.flow, self.attribute, saved)
        meta = {"epoch": saved.checkpoint.get("epoch"), "global_step": saved.checkpoint.get("global_step")}
        # step=: every Lightning save is kept (saves of different steps never supersede each
        # other) and load(step=N) finds it
        step = meta["global_step"] if isinstance(meta["global_step"], int) and meta["global_step"] >= 0 else None
        current.checkpoint.save(metadata={**meta, "path": saved.path}, step=step)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Before the Trainer restores a checkpoint, so that it reads ckpt_path through us.
        if not isinstance(trainer.strategy.checkpoint_io, _MetaflowIO):
            trainer.strategy.checkpoint_io = _MetaflowIO(trainer.strategy.checkpoint_io, self)

    def state_dict(self) -> dict:
        return {"rng": _rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        _set_rng_states(state_dict["rng"])


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
