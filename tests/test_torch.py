"""Real PyTorch state: one object graph per checkpoint, classes by reference, tensors as buffers.

Core tests run on a local directory (the store is exercised on every backend by test_core.py);
the flow test runs flows/train_torch.py for real, killed twice, against an uninterrupted run.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import FLOWS
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint import tensors
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.api import standalone
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import CheckpointStore

LOC = TaskLocation("TorchFlow", "3", "train", "7")


class Net(nn.Module):
    def __init__(self, width: int = 256):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x.sum()


def trained(width: int = 256):
    """A model, AdamW with state, and a scheduler, after one step."""
    torch.manual_seed(0)
    model = Net(width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    model(torch.randn(2, width)).backward()
    opt.step()
    sched.step()
    return model, opt, sched


@pytest.fixture
def cp(tmp_path):
    return Checkpointer(CheckpointStore(str(tmp_path / "root")))


def test_objects_shared_between_attributes_are_shared_after_load(cp):
    """The optimizer holds the model's own parameters and the scheduler that optimizer, after a
    load as before the save; plain Python objects shared by two names stay one object."""
    model, opt, sched = trained()
    history = [1, 2]
    state = {"model": model, "opt": opt, "sched": sched, "history": history, "also": {"h": history}}
    back = cp.restore(cp.save(LOC, 0, state))
    assert back["opt"].param_groups[0]["params"][0] is next(back["model"].parameters())
    assert all(p is q for p, q in zip(back["opt"].param_groups[0]["params"], back["model"].parameters()))
    assert back["sched"].optimizer is back["opt"]
    assert back["also"]["h"] is back["history"]
    before = next(back["model"].parameters()).detach().clone()
    back["model"](torch.randn(2, 256)).backward()
    back["opt"].step()  # the optimizer now updates the restored model, not orphan copies
    assert back["opt"].state[next(back["model"].parameters())]["step"] == 2
    assert not torch.equal(next(back["model"].parameters()), before)


def test_current_checkpoint_load_restores_shared_objects_onto_self(tmp_path):
    """current.checkpoint.load() puts one graph back on self: self.opt steers self.model."""
    me = SimpleNamespace()
    me.model, me.opt, me.sched = trained()
    standalone(me, str(tmp_path), LOC).save(wait=True)
    again = SimpleNamespace()
    standalone(again, str(tmp_path), LOC, attempt=1).load()
    assert again.opt.param_groups[0]["params"][0] is next(again.model.parameters())
    assert again.sched.optimizer is again.opt and type(again.model) is Net


def test_partial_load_brings_what_a_field_shares_and_skips_the_rest(cp):
    """fields=["sched"] returns the scheduler driving an optimizer over a model (all rebuilt,
    one graph), and fields=["n"] never reads the buffers of the model it does not need."""
    model, opt, sched = trained()
    artifact = cp.save(LOC, 0, {"model": model, "opt": opt, "sched": sched, "n": 5})
    back = cp.restore(artifact, fields=["sched"])
    assert list(back) == ["sched"]
    group = back["sched"].optimizer.param_groups[0]["params"]
    assert torch.equal(group[0], next(model.parameters()))
    pair = cp.restore(artifact, fields=["model", "opt"])
    assert pair["opt"].param_groups[0]["params"][0] is next(pair["model"].parameters())
    m = artifact.implicit_manifest
    for digest, size in (chunk for payload in m["buffers"] for chunk in payload):
        if size > 4096:
            cp.store.fs.rm_file(cp.store._object_path(LOC.flow, digest))
    assert cp.restore(artifact, fields=["n"]) == {"n": 5}


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
          torch.float8_e5m2, torch.int8, torch.uint8, torch.int16, torch.int64, torch.bool, torch.complex64]


def test_tensors_of_every_dtype_views_and_shared_storages_round_trip_exactly(cp):
    """Every dtype comes back bit for bit; views keep their offset and strides and share
    their base's storage again; a Parameter stays a Parameter; empty and 0-d tensors work."""
    base = torch.arange(40, dtype=torch.float32).reshape(5, 8)
    state = {f"t_{str(d)[6:]}": (torch.randn(33) * 4).to(d) for d in DTYPES}
    state.update(base=base, row=base[2], col=base[:, 3], tr=base.t(), empty=torch.empty(0, 3),
                 scalar=torch.tensor(3.5), param=nn.Parameter(torch.ones(4)), frozen=nn.Parameter(torch.ones(2), requires_grad=False))
    back = cp.restore(cp.save(LOC, 0, state))
    for name, value in state.items():
        got = back[name]
        assert got.dtype == value.dtype and got.shape == value.shape and got.stride() == value.stride(), name
        assert torch.equal(_bits(got), _bits(value)), name
    ptr = back["base"].untyped_storage().data_ptr()
    assert all(back[n].untyped_storage().data_ptr() == ptr for n in ("row", "col", "tr"))
    back["base"][2, 0] = -1
    assert back["row"][0] == -1 and back["tr"][0, 2] == -1  # one storage, as before the save
    assert type(back["param"]) is nn.Parameter and back["param"].requires_grad
    assert not back["frozen"].requires_grad and back["scalar"].item() == 3.5


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Compare 1-byte dtypes (float8 among them) by their bits: torch.equal lacks float8."""
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


def test_an_unchanged_model_is_not_rewritten_after_a_load(cp):
    """Tensors are addressed by their bytes: the save after a load writes only a manifest."""
    model, opt, sched = trained(512)
    first = cp.save(LOC, 0, {"model": model, "opt": opt, "sched": sched})
    back = cp.restore(first)
    again = cp.save(LOC, 1, back)
    assert again.written <= 0.01 * first.size


def test_changing_one_layer_writes_that_layer_only(cp):
    """Of four layers, one changed: the save writes that layer's weight and bias (and a manifest)."""
    model = Net(512)
    cp.save(LOC, 0, {"model": model})
    with torch.no_grad():
        model.layers[2].weight.add_(1.0)
    layer_bytes = 512 * 512 * 4
    second = cp.save(LOC, 0, {"model": model})
    assert layer_bytes <= second.written <= 1.1 * layer_bytes


def test_inspect_shows_types_shapes_and_shared_fields_from_the_manifest(cp):
    """The manifest alone tells each field's type, bytes, tensor shape/dtype/device, and which
    fields share objects."""
    model, opt, sched = trained()
    artifact = cp.save(LOC, 0, {"model": model, "opt": opt, "sched": sched, "w": torch.zeros(3, 4, dtype=torch.bfloat16)})
    fields = cp.read(artifact.key).fields
    assert fields["model"].type == f"{__name__}.Net" and fields["model"].size > 4 * 256 * 256 * 4
    assert fields["opt"].shares == ("model", "sched") and fields["sched"].shares == ("model", "opt")
    assert (fields["w"].shape, fields["w"].dtype, fields["w"].device) == ((3, 4), "torch.bfloat16", "cpu")
    assert fields["w"].shares == ()


def test_a_device_missing_at_load_restores_on_the_cpu_naming_the_field(capfd):
    """A storage saved on a device this process lacks comes back on the CPU, with a warning
    naming the field; the CPU needs no move."""
    from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.graph import loading_field

    storage = torch.arange(4, dtype=torch.float32).untyped_storage()
    assert tensors.place(storage, "cpu") is storage
    token = loading_field.set("model")
    try:
        with pytest.warns(UserWarning, match="Field 'model' was saved on cuda:0"):
            placed = tensors.place(storage, "cuda:0")
    finally:
        loading_field.reset(token)
    assert placed.device.type == "cpu" and "restored on the CPU" in capfd.readouterr().err
    assert tensors.device_available("cpu") and not tensors.device_available("cuda:0")


SAVE_WITH_CLASS = """
import sys
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.checkpointer import Checkpointer
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import TaskLocation
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.store import CheckpointStore

cp = Checkpointer(CheckpointStore(sys.argv[1]))
LOC = TaskLocation("TorchFlow", "3", "train", "7")
{definitions}
{action}
"""


def _script(tmp_path, definitions: str, action: str) -> subprocess.CompletedProcess:
    source = SAVE_WITH_CLASS.format(definitions=textwrap.dedent(definitions), action=textwrap.dedent(action))
    return subprocess.run([sys.executable, "-c", source, str(tmp_path / "root")],
                          capture_output=True, text=True, timeout=120)


def test_main_classes_travel_by_reference_and_a_missing_one_is_named(tmp_path):
    """A class of __main__ is stored by name: a process defining an edited class gets the
    edited one (and plain pickle of the restored value works), one lacking it gets an error
    naming the field and the class."""
    saved = _script(tmp_path, """
        class Model:
            def kind(self): return "old"
        """, 'print(cp.save(LOC, 0, {"model": Model(), "f": lambda x: x + 1}).key)')
    assert saved.returncode == 0, saved.stderr
    key = saved.stdout.strip()
    edited = _script(tmp_path, """
        import pickle
        class Model:
            def kind(self): return "new"
        """, f"""
        back = cp.load({key!r})[1]
        print(back["model"].kind(), type(back["model"]) is Model, back["f"](1), len(pickle.dumps(back["model"])) > 0)
        """)
    assert edited.stdout.split() == ["new", "True", "2", "True"], edited.stderr
    gone = _script(tmp_path, "", f"cp.load({key!r})")
    assert gone.returncode != 0
    assert f"CheckpointRestoreError: Field 'model' of checkpoint {key} needs __main__.Model" in gone.stderr


def test_the_torch_flow_killed_twice_ends_bit_identical_to_an_uninterrupted_run(run_flow):
    """flows/train_torch.py, SIGKILLed at epochs 2 and 4, resumes twice with its optimizer and
    scheduler sharing the model, and ends with every model and optimizer tensor equal to an
    uninterrupted run's."""
    from metaflow import Run

    with ThreadPoolExecutor(2) as pool:  # the two runs side by side: half the wall time
        crashed, clean = pool.map(lambda extra: run_flow(FLOWS / "train_torch.py", "run", *extra),
                                  [(), ("--crash-at", "")])
    assert crashed.output.count("killed at epoch") == 2
    assert crashed.output.count("optimizer and scheduler share the model: True") == 2
    a = Run(f"TorchTrainFlow/{crashed.run_id}")["train"].task
    b = Run(f"TorchTrainFlow/{clean.run_id}")["train"].task
    assert a["shared_after_load"].data is True
    model_a, model_b = a["final_model"].data, b["final_model"].data
    assert model_a.keys() == model_b.keys() and all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    opt_a, opt_b = a["final_opt"].data, b["final_opt"].data
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for i, tensors_a in opt_a["state"].items():
        assert all(torch.equal(v, opt_b["state"][i][k]) for k, v in tensors_a.items())
    assert not np.array_equal(model_a["net.0.weight"].numpy(), torch.zeros_like(model_a["net.0.weight"]).numpy())
