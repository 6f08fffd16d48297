"""Processes and their shared state: the process group of a ``torchrun`` run, the collectives
the trainer needs (gradient average, gather, barrier, "any rank asked to stop"), a rank's view of
the global batch, and the RNG streams a checkpoint saves and restores.

Under ``torchrun`` (``WORLD_SIZE > 1``) every process joins the default
process group (NCCL on CUDA, gloo on CPU). ``batch_size`` stays the *global* batch: every
rank draws the same global PK plan and reads its contiguous slice (``P / world_size`` whole
identities of ``K`` images), so the number of processes does not change the optimisation,
the paper's batch of 16 stays 16, and a two-process run equals a one-process run up to float
summation order wherever the loss is a per-sample mean. Gradients are averaged by an
explicit all-reduce between each backward and its optimiser step
(:func:`all_reduce_gradients`, passed to the step as ``gradient_sync``), not by wrapping the
model in ``DistributedDataParallel``. One EDAAN iteration runs two backward passes for two
optimisers over different parameter sets; the discriminators run inside the generator's loss
(frozen) and again in their own step; the attention nets stop receiving gradients at the
phase switch. DDP reduces the gradients of one forward during its backward, expects the same
parameters to require gradients on every iteration (or ``find_unused_parameters`` and an extra
graph traversal), and would have to wrap each sub-network separately with its own buckets.
One flat all-reduce per optimiser step is exact, has no such constraints, and costs one
collective of the gradient size, small next to EDAAN's convolutions; what it gives up is the
overlap of communication with the backward pass. What stays rank-local, as in DDP without
``SyncBatchNorm``: the batch statistics of the classifier's BatchNorm, the batch-hard mining
of the metric loss (over the rank's slice), and the image pools.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .run_config import RunConfigError

__all__ = ["DistInfo", "RankSlice", "all_reduce_gradients", "any_rank", "barrier", "gather",
           "init_distributed", "resolve_device", "rng_state", "seed_everything",
           "set_rng_state"]


def all_reduce_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Average the gradients of ``optimizer``'s parameters over the default process group.

    One flat buffer, one ``all_reduce`` (sum, then divide by the world size). Parameters
    without a gradient (frozen attention nets, the discriminators during the generator step)
    are skipped; they are the same on every rank because every rank is in the same phase.
    """
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


class RankSlice:
    """A batch sampler's view for one rank: its contiguous slice of every global batch.

    ``batch_size``, ``len``, ``set_epoch`` and the resumable state are those of the wrapped
    (global) sampler, whose position counts global batches; ``batch_size`` here is the slice.
    A PK batch lists its identities' ``K`` images together, so with ``P`` divisible by the
    world size every rank receives whole identities.
    """

    def __init__(self, sampler, rank: int, world_size: int):
        size = sampler.batch_size
        if size % world_size:
            raise RunConfigError(f"the global batch of {size} does not split evenly over "
                                 f"{world_size} processes")
        self.sampler, self.rank, self.world_size = sampler, rank, world_size
        self.batch_size = size // world_size

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            k = len(batch) // self.world_size
            yield batch[self.rank * k:(self.rank + 1) * k]

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None) -> tuple[DistInfo, bool]:
    """Join the default process group under ``torchrun`` (``WORLD_SIZE > 1``; NCCL on CUDA,
    gloo on CPU). Returns this process's :class:`DistInfo` and whether it created the group
    (and so must destroy it)."""
    owns = False
    if not dist.is_available():
        return DistInfo(), owns
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        wants_cuda = torch.cuda.is_available() and device != "cpu"
        dist.init_process_group("nccl" if wants_cuda else "gloo")
        owns = True
    if not dist.is_initialized():
        return DistInfo(), owns
    rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, int(os.environ.get("LOCAL_RANK", rank))), owns


def gather(info: DistInfo, obj: Any) -> list[Any]:
    """``obj`` of every rank (a one-item list without a process group)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def any_rank(info: DistInfo, flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (one all-reduce under a process group)."""
    if not info.enabled:
        return flag
    t = torch.tensor([float(flag)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return bool(t.item() > 0)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32),
                         state["numpy_pos"], *state["numpy_gauss"]))


def resolve_device(requested: str | None, info: DistInfo) -> torch.device:
    """The training device: ``requested`` (default: CUDA when available), under a process
    group the local rank's GPU."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise RunConfigError(f"device {name!r} is not a torch device (expected cpu, cuda or "
                             "cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise RunConfigError(f"device {name!r}: training runs on cpu or cuda, not "
                             f"{device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunConfigError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", info.local_rank if info.enabled else 0)
        torch.cuda.set_device(device)
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
