"""Cost of the framework integrations: `python benchmarks/frameworks_bench.py`

For each framework and model size, the integration's callback runs in a real Trainer (with
`current.checkpoint` a standalone one on local disk, as the step would have it), and every save
is timed twice: the framework's own save (the Trainer's `_save_checkpoint`; Lightning's
`CheckpointIO.save_checkpoint`, torch.save of its dict) and what the integration adds (reading
the folder and `current.checkpoint.save()`; `current.checkpoint.save()` of the dict), both as
seen by the training loop (a large save is written in the background), then `wait()` for the
last. Medians over the saves; CPU, this machine's disk. Install sizes: what each extra adds to
an environment that has torch (sum of the installed files of each distribution, from RECORD).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from importlib import metadata

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
from metaflow import current  # noqa: E402

from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone  # noqa: E402
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation  # noqa: E402

EXTRAS = {  # what `pip install .[hf]` / `.[lightning]` added to an environment with torch (pip's own report)
    "hf": ["transformers", "tokenizers", "huggingface_hub", "hf_xet", "safetensors", "accelerate", "psutil",
           "typer", "rich", "shellingham", "annotated_doc", "markdown_it_py", "mdurl", "httpx", "httpcore", "anyio", "tqdm"],
    "lightning": ["lightning", "pytorch_lightning", "lightning_utilities", "torchmetrics", "tqdm"],
}


class Timed:
    """Wraps a callable and records how long each call took."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - start)


def use_standalone(flow) -> None:
    root = tempfile.mkdtemp()
    current._update_env({"checkpoint": standalone(flow, root, TaskLocation("BenchFlow", "1", "train", "2"))})


def hf(n_embd: int, n_layer: int, vocab: int) -> tuple[float, float, float, int]:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.integrations.hf import (
        MetaflowCheckpointCallback,
    )

    flow = type("Flow", (), {})()
    use_standalone(flow)
    set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=16, n_embd=n_embd, n_layer=n_layer, n_head=2))
    ids = torch.randint(0, vocab, (48, 16), generator=torch.Generator().manual_seed(1))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=12, save_steps=2, per_device_train_batch_size=4,
                             use_cpu=True, report_to="none", disable_tqdm=True, save_total_limit=1)
    callback = MetaflowCheckpointCallback(flow)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids], callbacks=[callback])
    trainer._save_checkpoint = own = Timed(trainer._save_checkpoint)
    callback.on_save = ours = Timed(callback.on_save)
    trainer.train()
    waited = Timed(current.checkpoint.wait)
    waited()
    return statistics.median(own.seconds), statistics.median(ours.seconds), waited.seconds[0], sum(p.numel() for p in model.parameters())


def lightning(width: int) -> tuple[float, float, float, int]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.integrations.lightning import (
        MetaflowCheckpointCallback,
    )

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))

        def training_step(self, batch, _):
            return nn.functional.mse_loss(self.net(batch[0]).squeeze(-1), batch[1])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    flow = type("Flow", (), {})()
    use_standalone(flow)
    pl.seed_everything(0)
    model = Model()
    data = DataLoader(TensorDataset(torch.randn(64, 16), torch.randn(64)), batch_size=32)
    callback = MetaflowCheckpointCallback(flow)
    trainer = pl.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback, ModelCheckpoint(dirpath=tempfile.mkdtemp())])
    callback.save = ours = Timed(callback.save)
    own = Timed(trainer.strategy.checkpoint_io.save_checkpoint)  # the IO the integration wraps
    trainer.strategy.checkpoint_io.save_checkpoint = own
    trainer.fit(model, data)
    waited = Timed(current.checkpoint.wait)
    waited()
    return statistics.median(own.seconds), statistics.median(ours.seconds), waited.seconds[0], sum(p.numel() for p in model.parameters())


def installed_mib(names: list[str]) -> float:
    total = 0
    for name in names:
        dist = metadata.distribution(name)
        total += sum(f.size or 0 for f in dist.files or [])
    return total / 2**20


def main() -> None:
    runs = [("hf", "tiny GPT-2 (the tests')", lambda: hf(32, 2, 64)), ("hf", "GPT-2 256x4, 8k vocab", lambda: hf(256, 4, 8192)),
            ("lightning", "MLP 64 (the tests')", lambda: lightning(64)), ("lightning", "MLP 2048", lambda: lightning(2048))]
    which = sys.argv[1:] or ["hf", "lightning"]
    print("| framework | model | parameters | framework's own save | integration's save (returns) | last save durable after |")
    print("|---|---|---|---|---|---|")
    for framework, label, run in runs:
        if framework in which:
            own, ours, wait, params = run()
            print(f"| {framework} | {label} | {params:,} | {own * 1e3:.1f} ms | {ours * 1e3:.1f} ms | +{wait * 1e3:.1f} ms |")
    for extra, names in EXTRAS.items():
        print(f"[{extra}] installs {installed_mib(names):.0f} MiB beside torch ({', '.join(names)})")


if __name__ == "__main__":
    main()
