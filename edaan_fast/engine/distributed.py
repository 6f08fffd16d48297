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
``SyncBatchNorm``: the batch statistics of the classifier's BatchNorm and the image pools.
The batch-hard mining of the metric loss is global (:class:`GatheredMetricLoss`): with the
paper's P = 4 identities, mining inside a two-process slice of 2 identities would leave the
quartet loss no third identity, and inside a four-process slice of one identity no negative
at all (a zero metric term on every step).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .run_config import RunConfigError

__all__ = ["LOADER_STREAMS", "DistInfo", "GatheredMetricLoss", "RankSlice", "StopPoll",
           "all_reduce_gradients", "any_rank", "barrier", "derive_seed", "gather",
           "gather_rows", "init_distributed", "resolve_device", "rng_state", "seed_everything",
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


class _GatherRows(torch.autograd.Function):
    """Every rank's rows (equal counts), concatenated in rank order, with a backward.

    Every rank then computes the *same* loss from the gathered rows, so the gradient that
    reaches this rank's rows is the gradient of that loss with respect to them: its own slice
    of the incoming gradient, with no communication. It is multiplied by the world size because
    :func:`all_reduce_gradients` averages the parameter gradients over the ranks: the average of
    ``world_size * J_r^T g_r`` over ranks r is the single-process ``sum_r J_r^T g_r``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world, ctx.rows = dist.get_rank(), dist.get_world_size(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows] * ctx.world


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank of the default process group (the same number of rows on each),
    concatenated in rank order; differentiable (see :class:`_GatherRows`). ``x`` itself
    without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherRows.apply(x)  # without grad (labels) a plain gather, nothing recorded


class GatheredMetricLoss(nn.Module):
    """A batch-hard metric loss over the global batch of a data-parallel run: embeddings and
    labels of every rank are gathered (in rank order: the global PK batch's order) before the
    mining, so every rank computes the single-process loss and its gradient."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(gather_rows(emb), gather_rows(labels))


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
        # EDAAN_FAST_DIST_BACKEND=gloo: several processes sharing one GPU (NCCL refuses that)
        backend = os.environ.get("EDAAN_FAST_DIST_BACKEND") or ("nccl" if wants_cuda else "gloo")
        # rank 0 alone evaluates the target set and writes the translated source set while the
        # others wait in a collective: NCCL's default 10-minute timeout would abort the run
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
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


class StopPoll:
    """Whether any rank was asked to stop, polled every iteration without a host sync.

    The flag of iteration ``i`` travels in an asynchronous all-reduce over a CPU (gloo) group
    and is read at iteration ``i + 1``, by which time it has long arrived: every rank sees the
    same answer at the same iteration, so the ranks stop together, one iteration after the
    request. Without a process group the flag is answered at once.
    """

    def __init__(self, info: DistInfo):
        self.info = info
        self._group = None
        self._pending: tuple[Any, torch.Tensor] | None = None

    def __call__(self, flag: bool) -> bool:
        if not self.info.enabled:
            return flag
        if self._group is None:  # collective: every rank polls at the same iterations
            self._group = (dist.group.WORLD if dist.get_backend() == "gloo"
                           else dist.new_group(backend="gloo"))
        seen = self.drain()
        t = torch.tensor([float(flag)])
        self._pending = (dist.all_reduce(t, group=self._group, async_op=True), t)
        return seen

    def drain(self) -> bool:
        """Wait for the flag in flight (if any); whether it said stop."""
        if self._pending is None:
            return False
        work, t = self._pending
        self._pending = None
        work.wait()
        return bool(t.item() > 0)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The process's RNG streams, with the generator of the run's CUDA ``device`` only (a
    resuming process may see fewer GPUs, e.g. one GPU per task under a scheduler)."""
    np_state = np.random.get_state()
    cuda = (torch.cuda.get_rng_state(device)
            if device is not None and device.type == "cuda" else None)
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
    }


def _cuda_rng_of(saved: Any, device: torch.device) -> torch.Tensor | None:
    """The saved CUDA generator state for ``device``: the one state of a current checkpoint,
    or from an older checkpoint's list of every visible GPU's states the run device's entry
    (the first one when the list is shorter: the process now sees fewer GPUs)."""
    if isinstance(saved, torch.Tensor):
        return saved
    if isinstance(saved, (list, tuple)) and saved:
        index = device.index or 0
        return saved[index] if index < len(saved) else saved[0]
    return None


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore :func:`rng_state` (or an older checkpoint's); the CUDA state goes to the run's
    ``device`` and is skipped on a CPU run or when none was saved."""
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda":
        cuda = _cuda_rng_of(state.get("cuda"), device)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
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


#: How long a collective waits for the slowest rank (rank 0's evaluations included).
COLLECTIVE_TIMEOUT = timedelta(hours=2)

#: The salt of each training loader's augmentation stream (see :func:`derive_seed`).
LOADER_STREAMS = {"source": 1, "target": 2}


def derive_seed(seed: int, *salt: int) -> int:
    """The seed of one random stream of a run: ``seed`` itself for an all-zero ``salt``, else
    a well-mixed 31-bit seed of ``(seed, *salt)`` (numpy's ``SeedSequence``).

    The streams of a run: the process generators of rank r, ``derive_seed(seed, r)`` (rank 0
    keeps the run's seed, so a one-process run draws what it always drew), and the augmentation
    of training loader ``name`` on rank r, ``derive_seed(seed, r, LOADER_STREAMS[name])``. So the
    source and the target loader never flip and crop image i alike, and no two ranks share an
    augmentation or dropout stream. The samplers are seeded apart from these: every rank must
    draw the same global batch plan."""
    if not any(salt):
        return int(seed)
    return int(np.random.SeedSequence([int(seed), *map(int, salt)]).generate_state(1)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
