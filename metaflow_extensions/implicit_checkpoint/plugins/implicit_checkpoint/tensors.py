"""PyTorch tensors as out-of-band buffers: no copy on save, one on load, one buffer per storage.

A strided tensor (``torch.Tensor`` or ``nn.Parameter``, any dtype: bfloat16 and float8 too) is
pickled as its storage plus (dtype, offset, size, stride, requires_grad): views and tensors
sharing a storage point to one ``StorageRef``, which the pickle memo writes once, so they share
it again after loading. The storage's bytes leave the stream as a protocol-5 buffer viewing the
tensor's own memory. Loading wraps the buffer read from storage as the storage itself (no copy).

A storage on another device (CUDA, MPS) is copied to host memory when the save is captured
(that copy is the one cost that grows with the state in ``save()``) and moved back to the same
device at load when that device exists here; else it stays on the CPU with a warning naming
the attribute. Other tensors (sparse, quantized, nested, subclasses) use torch's own pickling.

Nothing here imports torch: the pickler calls in only when torch is already imported.
"""
from __future__ import annotations

import pickle
import sys
import warnings
from typing import Any


class StorageRef:
    """One storage of a save, as host bytes plus the device it lives on."""

    def __init__(self, storage: Any):
        import torch

        self.device = str(storage.device)
        host = storage if storage.device.type == "cpu" else storage.cpu()
        # A numpy view of the host bytes: it keeps them alive until the save is written.
        self.view = torch.empty(0, dtype=torch.uint8).set_(host).numpy() if host.nbytes() else bytearray()

    def reduce(self) -> tuple:
        return rebuild_storage, (pickle.PickleBuffer(self.view), self.device)


def reduce_tensor(t: Any, storages: dict) -> Any:
    """``(rebuild_tensor, args)`` for a plain strided tensor; NotImplemented for any other."""
    import torch

    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.is_quantized:
        return NotImplemented
    if getattr(t, "is_nested", False) or t.device.type == "meta":
        return NotImplemented
    storage = t.untyped_storage()
    ref = storages.get(id(storage))
    if ref is None:
        ref = storages[id(storage)] = (StorageRef(storage), storage)  # keep the id taken
    attrs = dict(vars(t)) or None  # attributes set on a Parameter (rare, but kept)
    return rebuild_tensor, (ref[0], t.dtype, t.storage_offset(), tuple(t.size()), t.stride(),
                            t.requires_grad, type(t) is torch.nn.Parameter, attrs)


def rebuild_storage(buffer: Any, device: str) -> Any:
    import torch

    if not len(buffer):
        storage = torch.UntypedStorage(0)
    elif type(buffer).__module__ == "numpy":
        storage = torch.from_numpy(buffer).untyped_storage()  # the very bytes read from storage
    else:
        storage = torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()
    return place(storage, device)


def place(storage: Any, device: str) -> Any:
    """The storage on ``device`` if this process has that device, else on the CPU (warned)."""
    if device == "cpu":
        return storage
    if device_available(device):
        return storage.to(device=device)
    from .graph import loading_field

    message = (f"Field {loading_field.get()!r} was saved on {device}, which this process does not "
               "have; it is restored on the CPU. Move it with .to(device) if needed.")
    warnings.warn(message)
    print(f"Warning: {message}", file=sys.stderr)  # Metaflow silences warnings in tasks
    return storage


def device_available(device: str) -> bool:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()
    if dev.type == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    try:
        torch.empty(0, device=dev)
        return True
    except (RuntimeError, AssertionError):
        return False


def rebuild_tensor(storage: Any, dtype: Any, offset: int, size: tuple, stride: tuple,
                   requires_grad: bool, parameter: bool, attrs: Any) -> Any:
    import torch

    t = torch.empty(0, dtype=dtype, device=storage.device).set_(storage, offset, size, stride)
    if parameter:
        t = torch.nn.Parameter(t, requires_grad=requires_grad)
    elif requires_grad:
        t.requires_grad_(True)
    for name, value in (attrs or {}).items():
        setattr(t, name, value)
    return t
