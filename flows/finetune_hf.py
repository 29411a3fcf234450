"""Train a tiny GPT-2 with the Hugging Face Trainer, killed twice with SIGKILL, and finish with
exactly the weights of an uninterrupted run.

    python flows/finetune_hf.py run                  # killed at global steps 12 and 20, resumes twice
    python flows/finetune_hf.py run --crash-at ""    # the same training, uninterrupted

The model is built from a config (2 layers, a 64-token vocabulary: nothing is downloaded). The
Trainer saves every 4 steps; MetaflowCheckpointCallback stores each of its checkpoints with
current.checkpoint, and in the next attempt writes the restored one into a fresh output folder
for trainer.train(resume_from_checkpoint=...): the Trainer skips the batches it already trained
on and restores the optimizer, the LR schedule and the random generators (dropout draws from them).
Needs `pip install "metaflow-implicit-checkpoint[hf]"`.
"""
import os
import shutil
import signal
import tempfile

import torch
from metaflow import FlowSpec, Parameter, checkpoint, current, retry, step


class CountingSequences(torch.utils.data.Dataset):
    """Sequences that count up modulo the vocabulary from a random start: a pattern to learn."""

    def __init__(self, n: int, length: int = 16, vocab: int = 64):
        starts = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(7))
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def kill_at(global_step: int):
    """A Trainer callback that SIGKILLs the attempt right after the save at ``global_step``."""
    from transformers import TrainerCallback

    class KillAt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == global_step:
                shutil.rmtree(args.output_dir)  # the next attempt may run on another machine
                current.checkpoint.wait()  # the crash strikes once that save is durable
                print(f"attempt {current.retry_count}: killed at global step {global_step}")
                os.kill(os.getpid(), signal.SIGKILL)

    return KillAt()


class FinetuneHFFlow(FlowSpec):
    epochs = Parameter("epochs", default=3, help="Passes over the data (8 steps each).")
    crash_at = Parameter("crash-at", default="12,20", help="Global steps at which attempts 0, 1, ... are killed.")

    @step
    def start(self):
        self.next(self.train)

    @retry(times=3, minutes_between_retries=0)
    @checkpoint
    @step
    def train(self):
        # Imported here: only this step pays for importing transformers (seconds).
        from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

        from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.integrations.hf import (
            MetaflowCheckpointCallback,
        )

        set_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
        args = TrainingArguments(
            output_dir=tempfile.mkdtemp(),  # a fresh disk each attempt, as on another machine
            num_train_epochs=self.epochs, per_device_train_batch_size=8, learning_rate=3e-3,
            save_strategy="steps", save_steps=4, save_total_limit=1, logging_steps=4,
            seed=0, use_cpu=True, dataloader_num_workers=0, report_to="none", disable_tqdm=True,
        )
        callbacks = [MetaflowCheckpointCallback(self)]
        crashes = [int(s) for s in self.crash_at.split(",") if s]
        if current.retry_count < len(crashes):
            callbacks.append(kill_at(crashes[current.retry_count]))
        trainer = Trainer(model=model, args=args, train_dataset=CountingSequences(64), callbacks=callbacks)
        resume = callbacks[0].resume_from(trainer)
        if resume:
            print(f"attempt {current.retry_count}: resumed at global step {self.hf_checkpoint.global_step}")
        trainer.train(resume_from_checkpoint=resume)
        self.final_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        self.next(self.end)

    @step
    def end(self):
        print(f"trained, losses {[round(x, 4) for x in self.losses]}")


if __name__ == "__main__":
    FinetuneHFFlow()
