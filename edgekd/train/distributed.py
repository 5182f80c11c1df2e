"""Device choice and multi-process training (torchrun) helpers.

Under ``torchrun --nproc-per-node N -m edgekd compress recipe.yaml`` every process runs the whole
pipeline; the training stages (teacher training, finetune, distill) train one model together with
DistributedDataParallel, and only rank 0 writes files. Without torchrun everything here is a
no-op and the process counts as rank 0 of 1.
"""

from __future__ import annotations

import os
import pickle
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from edgekd.errors import ConfigError, StageError


def resolve_device(name: str = "auto") -> torch.device:
    """``cpu`` | ``cuda`` | ``auto`` (CUDA when available). Under torchrun, CUDA means ``cuda:LOCAL_RANK``."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}", hint="use cpu, cuda or auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but PyTorch sees no CUDA GPU",
                          hint="use device: auto (falls back to CPU) or install a CUDA build of torch")
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    return torch.device("cuda", index)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def maybe_init_distributed(device: torch.device) -> bool:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on CUDA). True if distributed."""
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints, artifacts and reports."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place on a copy); the identity without a process group."""
    if not is_distributed():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients of parameters that live outside the DDP module (KD adaptors)."""
    if not is_distributed():
        return
    n = world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(n)


def _broadcast_bytes(payload: bytes | None) -> bytes:
    # NCCL moves only CUDA tensors, so the pickled bytes travel through this rank's GPU there
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    objects = [payload]
    dist.broadcast_object_list(objects, src=0, device=device)
    assert objects[0] is not None
    return objects[0]


def broadcast_module(module: nn.Module) -> nn.Module:
    """Rank 0's module on every rank, architecture included (a pruned student has new shapes).

    The module travels pickled between the processes of one job (never through a file), so a
    stage that ran on rank 0 only (prune, quantize) hands its result to the training ranks.
    """
    if not is_distributed():
        return module
    device = next(module.parameters(), torch.empty(0)).device
    payload = pickle.dumps(module.cpu()) if is_main_process() else None
    received = pickle.loads(_broadcast_bytes(payload))
    return received.to(device)


def broadcast_module_state(module: nn.Module) -> None:
    """In place: make ``module`` on every rank equal to rank 0's, even when rank 0 pruned it.

    All of an ``nn.Module``'s state (parameters, buffers, submodules, flags) lives in its
    ``__dict__``, so swapping that in makes the caller's reference see rank 0's model.
    """
    if not is_distributed():
        return
    received = broadcast_module(module)
    if type(received) is not type(module):
        raise StageError(f"rank {rank()} holds a {type(module).__name__} but rank 0 a {type(received).__name__}",
                         hint="every rank must build the same student; check the recipe is identical on all ranks")
    if received is not module:
        module.__dict__.clear()
        module.__dict__.update(received.__dict__)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` when distributed; the model itself otherwise."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
