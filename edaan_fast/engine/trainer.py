"""The EDAAN training job: schedule, variants, AMP, DDP, checkpoints, resume, feedback, report.

:class:`Trainer` owns what a run needs around the per-iteration step of
:class:`~edaan_fast.engine.EDAANTrainStep`: the data (PK-sampled labelled source batches,
random target batches), the model, the two Adam optimisers and their schedule, precision,
distribution over processes, checkpoints, evaluation, progress output and the final report.

**Schedule (paper §IV-B).** Adam, lr 2e-4, betas (0.5, 0.999), for both the generator side
(``E``, ``G``, ``A``, re-ID head) and the discriminators. The learning rate is constant for the
first half of the epochs and decays linearly over the second half (CycleGAN's "linear" rule,
:class:`LinearDecay`: factor ``1 - max(0, e + 1 - n_const) / (n_decay + 1)`` at 0-based epoch
``e``, so it reaches 0 just after the last epoch). Until the phase epoch (the paper's 30 of
200, scaled as ``max(1, round(30 / 200 * epochs))``, see
:func:`~edaan_fast.engine.run_config.phase_epochs`) the attention nets learn and the
discriminators see whole images; from it on the attention nets are frozen and the
discriminators see backgrounds only (:class:`~edaan_fast.engine.Phase`).

**Variants** are stages of the same loop (:data:`~edaan_fast.engine.run_config.VARIANTS`):
``edaan`` is one joint stage; ``daan`` and ``cyclegan`` train the translator (re-ID terms off)
for ``epochs`` epochs, write the translated source set to ``<output-dir>/translated/`` as PNG
files and the translator to ``translator.pt``, then train a freshly initialised re-ID module
(``E_S`` + head) for another ``epochs`` epochs on real + translated (``daan``) or translated
(``cyclegan``) images; ``direct`` is that re-ID stage on the real source images alone.

**Precision.** ``amp`` runs the step under ``torch.autocast``. ``amp_dtype="auto"`` picks
bfloat16 on CUDA devices that support it (no loss scaling needed), float16 with one
``GradScaler`` per optimiser on older GPUs, and bfloat16 on CPUs with native bfloat16
(AVX512-BF16/AMX). On a CPU without it, PyTorch runs bfloat16 convolutions through a slow
reference path (measured about 10x slower than float32 on the 2-core AVX2 machine), so AMP
would only slow training down: the run logs a warning and trains in float32. ``amp_dtype=
"bfloat16"`` forces autocast anyway.

**Distribution.** Under ``torchrun`` (``WORLD_SIZE > 1``) every process joins the default
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

**Checkpoints** (:func:`~edaan_fast.engine.checkpoint.save_checkpoint`, atomic) are written
every ``checkpoint_every`` epochs and at the end to ``<output-dir>/checkpoint.pt``; the end
state is also written to ``final.pt`` (identical content). They hold the model, the
optimisers, the schedulers, every rank's step state (image pools, grad scalers) and RNG
states, the samplers' positions and the evaluation history, so ``resume`` continues
bit-for-bit on the CPU with ``num_workers=0`` (the CPU default: augmentation then draws from
the process RNG, which the checkpoint restores; worker processes seed their own generators,
so with workers the resumed augmentation differs). Ctrl-C (SIGINT) asks the loop to finish
the current iteration (the final evaluation: to stop at once), save ``checkpoint.pt`` and raise
:class:`TrainingInterrupted`; a second Ctrl-C stops at once without writing (the last
checkpoint stays intact). A fresh run never replaces the run of its output folder unless told
to (``overwrite``), and removes the temporaries of checkpoint writes a killed process left.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from edaan_fast.data import PKSampler, RandomBatchSampler, Record, ReIDDataset, build_loader
from edaan_fast.losses import EDAANObjective, LossWeights, QuartetLoss, TripletLoss, id_loss
from edaan_fast.metrics import AttentionQuality
from edaan_fast.models import EDAAN, ModelConfig, model_config

from .checkpoint import (
    CheckpointError, load_checkpoint, load_model_state, model_config_from_dict,
    model_config_to_dict, remove_stale_temporaries, save_checkpoint,
)
from .evaluator import evaluate_attention
from .report import build_report, method_name, metrics_dict, transfer_name, write_report
from .run_config import RunConfig, RunConfigError, source_dataset, target_dataset
from .step import EDAANTrainStep, Phase

logger = logging.getLogger(__name__)

__all__ = [
    "HookBase", "LinearDecay", "RankSlice", "ReIDStep", "Trainer", "TrainingInterrupted",
    "all_reduce_gradients", "cpu_has_native_bf16", "evaluate_target", "resume_config", "train",
    "write_translated_set",
]

CHECKPOINT_NAME = "checkpoint.pt"
FINAL_NAME = "final.pt"
TRANSLATOR_NAME = "translator.pt"
TRANSLATED_DIR = "translated"
#: The files that make an output folder hold a run: a fresh run never replaces them unless
#: told to (``overwrite``), since ``final.pt`` is the result of a finished run.
RUN_FILES = (CHECKPOINT_NAME, FINAL_NAME, TRANSLATOR_NAME)
#: What ``overwrite`` deletes before a fresh run starts (so a folder never mixes two runs).
OVERWRITTEN_FILES = RUN_FILES + ("report.json", "report.md")

#: Options that may differ between a checkpoint's run and the run that resumes it: where and
#: how output goes, and how data are read. Everything else defines the training and must match.
RESUMABLE_KEYS = frozenset({"output_dir", "progress", "num_workers", "eval_every",
                            "checkpoint_every", "eval_batch_size", "device"})


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C (or a ``KeyboardInterrupt`` from a hook).

    Attributes:
        checkpoint: the checkpoint written at the interruption, or ``None`` if the stop came
            in the middle of an iteration (a second Ctrl-C) and nothing was written.
        epoch: completed epochs; iteration: completed iterations of the current epoch.
    """

    def __init__(self, checkpoint: Path | None, epoch: int, iteration: int,
                 during: str | None = None):
        self.checkpoint, self.epoch, self.iteration = checkpoint, epoch, iteration
        where = f"epoch {epoch + 1}, iteration {iteration}"
        at = f"during {during} (after {epoch} epochs)" if during else f"at {where}"
        msg = (f"training interrupted {at}; checkpoint saved to {checkpoint}; continue "
               f"with --resume {checkpoint}" if checkpoint is not None else
               f"training interrupted in the middle of an iteration ({where}); nothing was "
               "written, the last periodic checkpoint (if any) is intact")
        super().__init__(msg)


# ---------------------------------------------------------------------------------- schedule

class LinearDecay:
    """Learning-rate factor per 0-based epoch: 1 for the first ``ceil(epochs / 2)`` epochs, then
    ``1 - (e + 1 - n_const) / (n_decay + 1)`` (CycleGAN's ``linear`` policy). For 200 epochs:
    1.0 up to epoch 99, 100/101 at epoch 100, ..., 1/101 at epoch 199 (0 after the last).

    A callable object rather than a lambda so that ``LambdaLR.state_dict()`` stores it as plain
    data.
    """

    def __init__(self, epochs: int):
        self.epochs = int(epochs)
        self.constant_epochs = (self.epochs + 1) // 2

    def __call__(self, epoch: int) -> float:
        decay_epochs = self.epochs - self.constant_epochs
        return 1.0 - max(0, epoch + 1 - self.constant_epochs) / (decay_epochs + 1)


# ---------------------------------------------------------------------------------- precision

def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively on this CPU (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))


def resolve_precision(run: RunConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run (``None`` = float32); see the module docstring."""
    if not run.amp:
        return None
    if run.amp_dtype == "bfloat16":
        return torch.bfloat16
    if run.amp_dtype == "float16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "--amp: this CPU (%s) has no native bfloat16, so autocast would run the "
            "convolutions through PyTorch's slow reference kernels (about 10x slower than "
            "float32 here); training in float32. Force it with --amp-dtype bfloat16.",
            torch.backends.cpu.get_cpu_capability())
        return None
    return torch.bfloat16


# ---------------------------------------------------------------------------------- distribution

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


# ---------------------------------------------------------------------------------- re-ID step

class ReIDStep(EDAANTrainStep):
    """One re-ID-only iteration: ``E_S`` + re-ID head on labelled images, ``λ_id L_id +
    λ_metric L_metric`` (eq. 6-8), one optimiser.

    The re-ID stage of ``daan`` / ``cyclegan`` and the whole of ``direct``. It reuses the
    training step's autocast, grad scaler, gradient sync and non-finite check, and has no
    image pools.
    """

    TERMS = ("metric", "id", "total")

    def __init__(self, model: EDAAN, objective: EDAANObjective, **kwargs):
        super().__init__(model, objective, pool_size=0, **kwargs)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor,
                 optimizer: torch.optim.Optimizer) -> dict[str, float]:
        model, objective = self.model, self.objective
        device_type = x.device.type
        dtype = self._setup(device_type)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with self._autocast(device_type, dtype):
            out = model.reid(x)
            ident = id_loss(out.logits, labels, objective.label_smoothing)
            metric = (objective.metric_loss(out.embedding.float(), labels).float()
                      if objective.metric_loss is not None else ident.new_zeros(()))
            total = objective.weights.id * ident + objective.weights.quartet * metric
        log = self._to_floats("re-ID", self.TERMS, [metric, ident, total], dtype)
        skipped = self._optimise(total, optimizer, self.scaler_G)
        self.num_steps += 1
        log["skipped_G"] = float(skipped)
        return log


# ---------------------------------------------------------------------------------- hooks

class HookBase:
    """Callbacks of :class:`Trainer` (fast-reid's hook pattern); override what you need.

    Hooks run on every rank; one that raises ``KeyboardInterrupt`` in ``after_iteration``
    stops training at that iteration exactly as Ctrl-C does (checkpoint, then
    :class:`TrainingInterrupted`).
    """

    def before_train(self, trainer: Trainer) -> None: ...

    def after_iteration(self, trainer: Trainer, log: dict[str, float]) -> None: ...

    def after_epoch(self, trainer: Trainer) -> None: ...

    def after_train(self, trainer: Trainer, report: dict[str, Any]) -> None: ...


class _StopRequest:
    """SIGINT -> "stop after this iteration"; a second SIGINT raises at once, and so does the
    first while ``immediate`` (no training state is changing: the final evaluation).

    Loader worker processes forked from the trainer inherit the handler; a terminal's Ctrl-C
    reaches them too, and they ignore it (the trainer process decides, and says so once).
    """

    def __init__(self):
        self.requested = False
        self.immediate = False
        self._previous = None
        self._installed = False
        self._pid = os.getpid()

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handler(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a loader worker
        if self.requested or self.immediate:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupt: finishing this iteration, then saving a checkpoint "
                       "(Ctrl-C again to stop at once, without saving)")


# ---------------------------------------------------------------------------------- helpers

@dataclass(frozen=True)
class Stage:
    """One stage of a variant: ``joint`` (EDAAN), ``translator`` or ``reid``."""

    name: str
    epochs: int


def _stages(run: RunConfig) -> list[Stage]:
    if run.end_to_end:
        return [Stage("joint", run.epochs)]
    if run.translator:
        return [Stage("translator", run.epochs), Stage("reid", run.epochs)]
    return [Stage("reid", run.epochs)]


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32),
                         state["numpy_pos"], *state["numpy_gauss"]))


def _denormalise(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.pixel_mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.pixel_std, device=x.device).view(1, -1, 1, 1)
    return (x.float() * std + mean).clamp(0.0, 1.0)


def evaluate_target(model: nn.Module, run: dict[str, Any], dataset: ReIDDataset, *,
                    device: torch.device | str = "cpu", batch_size: int = 128,
                    num_workers: int = 0, progress: bool = False):
    """Target-domain scores of ``model`` as a run reports them (a ``ProtocolResult``).

    Float32 features of ``encoder_S + embedding`` (no flip, no re-ranking), squared euclidean
    distance, ``run["loader"]`` at ``run["image_size"]``; protocol by target: Market-1501 /
    DukeMTMC-reID / synthetic single query, CUHK03 single-gallery-shot, PRID2011 the mean of
    both directions. ``python -m edaan_fast.evaluate`` with its defaults computes the same.
    """
    from .evaluator import (
        evaluate_features, evaluate_model, evaluate_prid2011, extract_split_features,
    )

    kw = dict(image_size=tuple(run["image_size"]), batch_size=batch_size, loader=run["loader"],
              num_workers=num_workers, device=device, amp=False, flip=False, progress=progress)
    target = run["target"]
    if target == "cuhk03":
        f = extract_split_features(model, {"query": dataset.query, "gallery": dataset.gallery},
                                   **kw)
        return evaluate_features(f["query"], f["gallery"], "cuhk03")
    if target == "prid2011":
        from edaan_fast.data import build_dataset

        root = run.get("target_root") or run.get("data_root")
        b2a = build_dataset("prid2011", root=root, direction="b2a")
        f = extract_split_features(model, {"qa": dataset.query, "gb": dataset.gallery,
                                           "qb": b2a.query, "ga": b2a.gallery}, **kw)
        return evaluate_prid2011((f["qa"], f["gb"]), (f["qb"], f["ga"]))["mean"]
    return evaluate_model(model, dataset, **kw)


@torch.no_grad()
def write_translated_set(model: EDAAN, records: Sequence[Record], folder: str | os.PathLike, *,
                         image_size: tuple[int, int], device: torch.device | str = "cpu",
                         batch_size: int = 64, num_workers: int = 0, loader: str = "torch",
                         progress: bool = False) -> list[Record]:
    """Translate ``records`` S -> T with ``model`` (eq. 1) and write them as PNG files.

    The folder is written under a temporary name and renamed when complete, with a
    ``.complete.json`` marker; the returned records point at the PNGs and keep the source
    pids and cameras (``<index>.png`` in the order of ``records``).
    """
    from PIL import Image

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    was_training = model.training
    model.eval()
    dl = build_loader(records, loader=loader, train=False, batch_size=batch_size,
                      num_workers=num_workers, image_size=image_size)
    batches = dl
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(dl, desc="translating", unit="batch", leave=False)
    for batch in batches:
        x = batch.images.to(device)
        images = _denormalise(model.translate_s2t(x), model.config)
        pixels = images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for k, index in enumerate(batch.index.tolist()):
            Image.fromarray(pixels[k]).save(tmp / f"{index:06d}.png")
    model.train(was_training)
    (tmp / ".complete.json").write_text(json.dumps({"count": len(records)}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return _translated_records(records, folder)


def _translated_records(records: Sequence[Record], folder: Path) -> list[Record]:
    return [Record(str(folder / f"{i:06d}.png"), r.pid, r.camid) for i, r in enumerate(records)]


def _translated_complete(records: Sequence[Record], folder: Path) -> bool:
    try:
        return json.loads((folder / ".complete.json").read_text())["count"] == len(records)
    except (OSError, ValueError, KeyError):
        return False


def _check_output_dir(folder: Path, resume: str | os.PathLike | None, overwrite: bool,
                      runs: bool = True) -> None:
    """Refuse an output folder that cannot be one, or (``runs``) that holds a run this one
    would replace.

    A fresh run needs ``overwrite`` to write into a folder holding :data:`RUN_FILES`; a
    resumed run may write into the folder of the checkpoint it resumes, and needs
    ``overwrite`` for another folder holding a run.
    """
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == folder else f"is under {existing}, which is a file"
        raise RunConfigError(f"output_dir {folder} {what}; expected a folder (it is created if "
                             "missing)")
    if overwrite or not runs or not folder.is_dir():
        return
    found = [name for name in RUN_FILES if (folder / name).exists()]
    if not found:
        return
    if resume is not None:
        if Path(resume).resolve().parent == folder.resolve():
            return
        raise RunConfigError(
            f"output_dir {folder} holds another run ({', '.join(found)}), which resuming "
            f"{resume} there would replace: pass --output-dir {Path(resume).parent} (the "
            "checkpoint's own folder) or another folder, or --overwrite to replace it")
    ckpt = folder / (CHECKPOINT_NAME if CHECKPOINT_NAME in found else found[0])
    raise RunConfigError(
        f"output_dir {folder} already holds a run ({', '.join(found)}); a new run would replace "
        f"it: continue it with --resume {ckpt}, start over with --overwrite (deletes "
        f"{', '.join(found)}), or choose another --output-dir")


def resume_config(checkpoint_run: dict[str, Any], overrides: dict[str, Any]) -> RunConfig:
    """The run configuration of a resumed run: the checkpoint's, with ``overrides`` applied.

    Only :data:`RESUMABLE_KEYS` may change (plus ``resume`` itself); a different value of any
    other option raises :class:`RunConfigError` naming it, since it would change the training
    the checkpoint is part of.
    """
    base = RunConfig.from_dict({k: v for k, v in checkpoint_run.items()
                                if k not in RunConfig.DERIVED}, "checkpoint run")
    base_resolved = base.resolve().to_dict()
    changed = {}
    for key, value in overrides.items():
        key = key.replace("-", "_")
        if key in RESUMABLE_KEYS:
            continue
        candidate = base.replace(**{key: value}).resolve().to_dict()[key]
        if candidate != base_resolved[key]:
            changed[key] = (base_resolved[key], value)
    if changed:
        detail = ", ".join(f"{k}={old!r} in the checkpoint but {new!r} given"
                           for k, (old, new) in sorted(changed.items()))
        raise RunConfigError(
            f"--resume continues the checkpoint's run; these options differ: {detail}. Only "
            f"{', '.join(sorted(RESUMABLE_KEYS))} may change on resume.")
    allowed = {k.replace("-", "_"): v for k, v in overrides.items()
               if k.replace("-", "_") in RESUMABLE_KEYS}
    return base.replace(**allowed).resolve()


# ---------------------------------------------------------------------------------- trainer

class Trainer:
    """Trains one run (see the module docstring); :meth:`fit` returns the report dict.

    Args:
        run: the run configuration (resolved here).
        hooks: :class:`HookBase` instances.
        resume: a checkpoint written by a run of the same configuration (see
            :func:`resume_config`) to continue from.
        overwrite: let a fresh run replace the run in ``output_dir`` (its checkpoints and
            report are deleted when training starts). Without it, a fresh run into a folder
            that holds ``checkpoint.pt``, ``final.pt`` or ``translator.pt`` is refused, and so
            is resuming into such a folder from a checkpoint kept elsewhere.

    Raises:
        RunConfigError: an invalid configuration, or one that does not match ``resume``; an
            output folder that is a file or holds another run (see ``overwrite``).
        CheckpointError: ``resume`` is missing, truncated, foreign, or holds weights only.
        DatasetError: a data set is missing or malformed.
    """

    def __init__(self, run: RunConfig, *, hooks: Sequence[HookBase] = (),
                 resume: str | os.PathLike | None = None, overwrite: bool = False):
        self.run = run.resolve()
        self.hooks = list(hooks)
        self.output_dir = Path(self.run.output_dir)
        self.overwrite = bool(overwrite) and resume is None
        # a resume checks the folder's run after the checkpoint: its errors come first
        _check_output_dir(self.output_dir, resume, overwrite, runs=resume is None)
        self.dist = self._init_distributed()
        self.device = self._resolve_device()
        self.precision = resolve_precision(self.run, self.device)
        self.num_workers = (self.run.num_workers if self.run.num_workers is not None
                            else (0 if self.device.type == "cpu" else 4))
        run_dict = self.run.to_dict()
        self.source = source_dataset(run_dict)
        self.target = target_dataset(run_dict)
        try:
            self.model_config = model_config(
                self.run.preset, image_size=tuple(self.run.image_size),
                num_ids=self.source.num_train_pids, no_attention=not self.run.attention,
                **{"reid_attention_grad": self.run.reid_attention_grad, **self.run.model})
        except (TypeError, ValueError) as exc:
            raise RunConfigError(f"model configuration: {exc}") from None
        P = self.run.num_identities_per_batch
        if P % self.dist.world_size:
            raise RunConfigError(
                f"batch_size {self.run.batch_size} with num_instances {self.run.num_instances} "
                f"gives {P} identities per batch, which do not split evenly over "
                f"{self.dist.world_size} processes")
        self.objective = EDAANObjective(
            (QuartetLoss if self.run.metric_loss == "quartet" else TripletLoss)(self.run.margin),
            LossWeights(gan=self.run.lambda_gan, cycle=self.run.lambda_cyc,
                        attention=self.run.lambda_attn, quartet=self.run.lambda_metric,
                        attention_tv=self.run.lambda_tv,
                        id=self.run.lambda_id),
            label_smoothing=self.run.label_smoothing,
            attention_consistency=self.run.attention_consistency)
        self.stages = _stages(self.run)
        self.total_epochs = sum(s.epochs for s in self.stages)
        self.epoch = 0          # completed epochs over all stages
        self.iteration = 0      # completed iterations of the current epoch
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.attention: dict[str, Any] | None = None  # latest attention quality
        self.elapsed_before = 0.0
        self.stage_index = -1
        self._in_step = False
        self._writer = None
        self._target_iter = None
        self._probe: torch.Tensor | None = None
        self._seed_everything(self.run.seed)
        if resume is not None:
            self._resume(Path(resume))
            _check_output_dir(self.output_dir, resume, overwrite)
        else:
            self._build_stage(0)

    # ------------------------------------------------------------------ setup

    def _init_distributed(self) -> DistInfo:
        self._owns_group = False
        if not dist.is_available():
            return DistInfo()
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            wants_cuda = torch.cuda.is_available() and self.run.device != "cpu"
            dist.init_process_group("nccl" if wants_cuda else "gloo")
            self._owns_group = True
        if not dist.is_initialized():
            return DistInfo()
        rank, world = dist.get_rank(), dist.get_world_size()
        return DistInfo(rank, world, int(os.environ.get("LOCAL_RANK", rank)))

    def _resolve_device(self) -> torch.device:
        name = self.run.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
                device = torch.device("cuda", self.dist.local_rank if self.dist.enabled else 0)
            torch.cuda.set_device(device)
        return device

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def stage_at(self, epoch: int) -> tuple[int, int]:
        """``(stage index, epoch within the stage)`` of a global 0-based epoch."""
        for index, stage in enumerate(self.stages):
            if epoch < stage.epochs:
                return index, epoch
            epoch -= stage.epochs
        return len(self.stages) - 1, self.stages[-1].epochs

    @property
    def stage(self) -> Stage:
        return self.stages[self.stage_index]

    def _new_model(self, salt: int) -> EDAAN:
        """A freshly initialised model, seeded from ``(seed, salt)`` without touching the
        global RNG stream (so a resumed run and a straight run draw the same numbers)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.run.seed * 1000 + salt)
            model = EDAAN(self.model_config)
        model.to(self.device)
        if self.run.compile:
            for module in model.children():
                module.compile()
        return model

    def _adam(self, params) -> torch.optim.Adam:
        return torch.optim.Adam(params, lr=self.run.lr, betas=(self.run.beta1, self.run.beta2))

    def _generator_groups(self):
        """The generator optimiser's parameters: one group, or the attention nets in a group of
        their own when ``attention_lr_scale`` is not 1 (their learning rate is
        ``lr * attention_lr_scale``)."""
        scale = self.run.attention_lr_scale
        if scale == 1.0 or not self.model.has_attention:
            return self.model.generator_parameters()
        nets = [p for net in self.model.attention_nets() for p in net.parameters()]
        attention = {id(p) for p in nets}
        rest = [p for p in self.model.generator_parameters() if id(p) not in attention]
        return [{"params": rest}, {"params": nets, "lr": self.run.lr * scale}]

    def _sampler(self, sampler):
        return RankSlice(sampler, self.dist.rank, self.dist.world_size) if self.dist.enabled \
            else sampler

    def _loader(self, records: Sequence[Record], sampler):
        return build_loader(records, loader=self.run.loader, train=True, sampler=sampler,
                            num_workers=self.num_workers, image_size=tuple(self.run.image_size),
                            seed=self.run.seed, pad=self.run.pad, flip_p=self.run.flip_p,
                            pin_memory=self.device.type == "cuda")

    def _stage_records(self, index: int) -> list[Record]:
        stage = self.stages[index]
        if stage.name != "reid" or self.run.reid_data == "real":
            return list(self.source.train)
        folder = self.output_dir / TRANSLATED_DIR
        # rank 0's view decides, so that every rank takes the same (collective) path
        if not self._gather(_translated_complete(self.source.train, folder))[0]:
            self._write_translated_from_checkpoint(folder)
        translated = _translated_records(self.source.train, folder)
        if self.run.reid_data == "translated":
            return translated
        return list(self.source.train) + translated

    def _build_stage(self, index: int) -> None:
        """Model, optimisers, schedulers, step and loaders of stage ``index`` (no side
        effects on disk except regenerating a missing translated set)."""
        stage = self.stages[index]
        self.stage_index = index
        self.model = self._new_model(salt=index)
        sync = all_reduce_gradients if self.dist.enabled else None
        amp = dict(amp=self.precision is not None, amp_dtype=self.precision, gradient_sync=sync)
        if stage.name == "reid":
            params = chain(self.model.encoder_S.parameters(), self.model.reid_head.parameters())
            self.optimizers = {"reid": self._adam(params)}
            self.step = ReIDStep(self.model, self.objective, **amp)
        else:
            self.optimizers = {"G": self._adam(self._generator_groups()),
                               "D": self._adam(self.model.discriminator_parameters())}
            self.step = EDAANTrainStep(self.model, self.objective, pool_size=self.run.pool_size,
                                       seed=self.run.seed + 7919 * self.dist.rank, **amp)
        self.schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, LinearDecay(stage.epochs))
                           for k, o in self.optimizers.items()}
        records = self._stage_records(index)
        pk = PKSampler(records, self.run.num_identities_per_batch,
                       self.run.num_instances, seed=self.run.seed)
        self.source_loader = self._loader(records, self._sampler(pk))
        self.iterations_per_epoch = len(self.source_loader)
        if self.run.iters_per_epoch is not None:
            if self.run.iters_per_epoch > self.iterations_per_epoch:
                raise RunConfigError(
                    f"iters_per_epoch={self.run.iters_per_epoch} exceeds the "
                    f"{self.iterations_per_epoch} PK batches of one pass over the {stage.name} "
                    f"stage's {len(records)} images")
            self.iterations_per_epoch = self.run.iters_per_epoch
        self._close_target_iter()
        self.target_loader = None
        if stage.name != "reid":
            target = RandomBatchSampler(len(self.target.train), self.run.batch_size,
                                        seed=self.run.seed + 1)
            self.target_loader = self._loader(self.target.train, self._sampler(target))

    def _enter_stage(self, index: int) -> None:
        """Move to stage ``index``; after a translator stage, save the translator and write
        the translated source set first."""
        previous = self.stages[self.stage_index]
        if previous.name == "translator" and self.stages[index].name == "reid":
            self._finish_translator()
        self._build_stage(index)

    def _finish_translator(self) -> None:
        self._record_attention()
        if self.dist.is_main:
            save_checkpoint(self.output_dir / TRANSLATOR_NAME, {
                "model_config": model_config_to_dict(self.model_config),
                "model": self.model.state_dict(), "epoch": self.epoch,
                "run": self.run.to_dict()})
            if self.run.reid_data != "real":
                logger.info("writing the translated source set (%d images) to %s",
                            len(self.source.train), self.output_dir / TRANSLATED_DIR)
                self._translate(self.model, self.output_dir / TRANSLATED_DIR)
        self._barrier()

    def _translate(self, model: EDAAN, folder: Path) -> None:
        write_translated_set(model, self.source.train, folder,
                             image_size=tuple(self.run.image_size), device=self.device,
                             batch_size=self.run.eval_batch_size, num_workers=self.num_workers,
                             loader=self.run.loader, progress=self.run.progress)

    def _write_translated_from_checkpoint(self, folder: Path) -> None:
        path = self.output_dir / TRANSLATOR_NAME
        if self.dist.is_main:
            ckpt = load_checkpoint(path, kind="model")
            where = f"checkpoint {path}"
            translator = EDAAN(model_config_from_dict(ckpt["model_config"], where))
            load_model_state(translator, ckpt["model"], where)
            logger.info("regenerating the translated source set from %s", path)
            self._translate(translator.to(self.device), folder)
        self._barrier()

    def _barrier(self) -> None:
        if self.dist.enabled:
            dist.barrier()

    # ------------------------------------------------------------------ checkpoints

    def _gather(self, obj: Any) -> list[Any]:
        if not self.dist.enabled:
            return [obj]
        out: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(out, obj)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint payload (see the module docstring); collective under DDP."""
        ranks = self._gather({"rng": _rng_state(), "step": self.step.state_dict()})
        return {
            "model_config": model_config_to_dict(self.model_config),
            "model": self.model.state_dict(),
            "epoch": self.epoch,
            "run": self.run.to_dict(),
            "stage": self.stage_index,
            "stage_name": self.stage.name,
            "iteration": self.iteration,
            "global_step": self.global_step,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "ranks": ranks,
            "world_size": self.dist.world_size,
            "sampler": {"source": self.source_loader.state_dict(),
                        "target": (self.target_loader.state_dict()
                                   if self.target_loader is not None else None)},
            "metrics": {"history": list(self.history), "attention": self.attention},
            "elapsed": self._elapsed(),
        }

    def save(self, name: str = CHECKPOINT_NAME) -> Path:
        """Write the checkpoint (rank 0; every rank must call this under DDP)."""
        state = self.state_dict()
        path = self.output_dir / name
        if self.dist.is_main:
            save_checkpoint(path, state)
            logger.info("checkpoint: %s (epoch %d, iteration %d)", path, self.epoch,
                        self.iteration)
        self._barrier()
        return path

    def _resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path, kind="training")  # the schema: entries and their types
        where = f"checkpoint {path}"
        resume_config(ckpt["run"], {k: v for k, v in self.run.to_dict().items()
                                    if k not in RunConfig.DERIVED})
        if len(ckpt["ranks"]) != self.dist.world_size:
            raise CheckpointError(
                f"{path} was written by {len(ckpt['ranks'])} process(es); resume it with the "
                f"same number (this run has {self.dist.world_size})")
        if model_config_to_dict(self.model_config) != ckpt["model_config"]:
            raise CheckpointError(f"{path}: its model_config {ckpt['model_config']} differs from "
                                  f"this run's {model_config_to_dict(self.model_config)}")
        if ckpt["stage"] >= len(self.stages):
            raise CheckpointError(
                f"{where}: stage {ckpt['stage']} does not exist in a {self.run.variant} run "
                f"(stages {', '.join(f'{i} {s.name}' for i, s in enumerate(self.stages))})")
        if ckpt["epoch"] > self.total_epochs:
            raise CheckpointError(f"{where}: epoch {ckpt['epoch']} is past the run's "
                                  f"{self.total_epochs} epochs")
        self.epoch = int(ckpt["epoch"])
        self.iteration = int(ckpt.get("iteration", 0))
        self.global_step = int(ckpt.get("global_step", 0))
        self.history = list(ckpt.get("metrics", {}).get("history", []))
        self.attention = ckpt.get("metrics", {}).get("attention")
        self.elapsed_before = float(ckpt.get("elapsed", 0.0))
        self._build_stage(int(ckpt["stage"]))
        load_model_state(self.model, ckpt["model"], where)
        if set(ckpt["optimizers"]) != set(self.optimizers) or \
                set(ckpt["schedulers"]) != set(self.optimizers):
            raise CheckpointError(f"{path}: optimisers {sorted(ckpt['optimizers'])} do not fit "
                                  f"the {self.stage.name} stage ({sorted(self.optimizers)})")
        mine = ckpt["ranks"][self.dist.rank]
        part = "optimiser"
        try:  # the schema is checked; a state that still does not fit is named here
            for k, opt in self.optimizers.items():
                opt.load_state_dict(ckpt["optimizers"][k])
                part = "scheduler"
                self.schedulers[k].load_state_dict(ckpt["schedulers"][k])
                part = "optimiser"
            part = "training step (image pools, grad scalers)"
            self.step.load_state_dict(mine["step"])
            self.step.pool_S.to(self.device)
            self.step.pool_T.to(self.device)
            part = "sampler"
            self.source_loader.load_state_dict(ckpt["sampler"]["source"])
            if self.target_loader is not None and ckpt["sampler"]["target"] is not None:
                self.target_loader.load_state_dict(ckpt["sampler"]["target"])
            part = "random number generator"
            _set_rng_state(mine["rng"])  # last: nothing after it may draw random numbers
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            text = str(exc).strip().splitlines()
            raise CheckpointError(f"{where}: its {part} state cannot be restored "
                                  f"({type(exc).__name__}: {text[0] if text else ''})") from None
        logger.info("resumed %s at epoch %d, iteration %d (%s stage)", path, self.epoch,
                    self.iteration, self.stage.name)

    # ------------------------------------------------------------------ feedback

    def _elapsed(self) -> float:
        start = getattr(self, "_start_time", None)
        return self.elapsed_before + (time.perf_counter() - start if start is not None else 0.0)

    def _open_writer(self) -> None:
        if not self.dist.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("tensorboard is not installed: no TensorBoard scalars "
                           "(pip install tensorboard)")
            return
        self._writer = SummaryWriter(str(self.output_dir / "tensorboard"),
                                     purge_step=self.global_step or None)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None and value is not None:
            self._writer.add_scalar(tag, value, step)

    @torch.no_grad()
    def _save_grid(self) -> None:
        """Source | attention mask | translation S -> T | cycle reconstruction, as a PNG."""
        if not self.dist.is_main or self.stage.name == "reid":
            return
        try:
            from edaan_fast.viz import plot_translation_grid
        except ImportError as exc:
            logger.warning("no image grid (edaan_fast.viz needs matplotlib: %s)", exc)
            return
        if self._probe is None:
            dl = build_loader(self.source.train[:8], train=False, batch_size=8, num_workers=0,
                              image_size=tuple(self.run.image_size))
            self._probe = next(iter(dl)).images
        model, cfg = self.model, self.model_config
        was_training = model.training
        model.eval()
        x = self._probe.to(self.device)
        s2t = model.s2t(x)
        rec = model.t2s(s2t.image).image if cfg.cycle_through_attention else \
            model.generator_T(model.encoder_T(s2t.generated))
        columns = {"source": _denormalise(x, cfg)}
        if s2t.attention is not None:
            columns["attention"] = s2t.attention.float().clamp(0, 1).expand(-1, 3, -1, -1)
        columns["translation"] = _denormalise(s2t.image, cfg)
        columns["cycle"] = _denormalise(rec, cfg)
        model.train(was_training)
        path = self.output_dir / "images" / f"epoch{self.epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_translation_grid({k: v.cpu() for k, v in columns.items()}, path,
                              value_range=(0.0, 1.0))

    def evaluate(self) -> dict[str, float | None]:
        """Target metrics of the current model (rank 0 computes; every rank gets them)."""
        metrics = None
        if self.dist.is_main:
            result = evaluate_target(self.model, self.run.to_dict(), self.target,
                                     device=self.device, batch_size=self.run.eval_batch_size,
                                     num_workers=self.num_workers)
            metrics = metrics_dict(result)
        return self._gather(metrics)[0]

    def measure_attention(self) -> dict[str, Any] | None:
        """Attention quality of ``A_S`` / ``A_T`` on the held-out test images of each domain
        (:func:`~edaan_fast.engine.evaluator.evaluate_attention`; rank 0 computes, every rank
        gets it), or ``None`` when the current stage trains no attention nets."""
        if self.stage.name == "reid" or not self.model.has_attention:
            return None
        result = None
        if self.dist.is_main:
            q = evaluate_attention(
                self.model, {"A_S": self.source.query + self.source.gallery,
                             "A_T": self.target.query + self.target.gallery},
                image_size=tuple(self.run.image_size), device=self.device,
                batch_size=self.run.eval_batch_size)
            result = {"epoch": self.epoch, **{k: v.to_dict() for k, v in q.items()}}
        return self._gather(result)[0]

    def _record_attention(self) -> None:
        """Measure the attention, log it, and keep it as the run's latest (``report.json``)."""
        quality = self.measure_attention()
        if quality is None:
            return
        self.attention = quality
        for net in ("A_S", "A_T"):
            for k, v in quality[net].items():
                if k != "images":
                    self._scalar(f"attention/{net}/{k}", v, self.epoch)
        logger.info("epoch %d attention: A_S %s | A_T %s", self.epoch,
                    AttentionQuality(**quality["A_S"]).summary(),
                    AttentionQuality(**quality["A_T"]).summary())

    def _record_evaluation(self, metrics: dict[str, float | None]) -> None:
        self.history.append({"epoch": self.epoch, "metrics": metrics})
        for k, v in metrics.items():
            self._scalar(f"target/{k}", v, self.epoch)
        logger.info("epoch %d target: R1 %.1f  R5 %.1f  R10 %.1f  mAP %.1f  mINP %s",
                    self.epoch, 100 * metrics["rank1"], 100 * metrics["rank5"],
                    100 * metrics["rank10"], 100 * metrics["mAP"],
                    "-" if metrics["mINP"] is None else f"{100 * metrics['mINP']:.1f}")

    # ------------------------------------------------------------------ the loop

    def _next_target(self) -> torch.Tensor:
        if self._target_iter is None:
            self._target_iter = iter(self.target_loader)
        try:
            return next(self._target_iter).images
        except StopIteration:
            self._target_iter = iter(self.target_loader)
            return next(self._target_iter).images

    def _close_target_iter(self) -> None:
        if self._target_iter is not None:
            self._target_iter.close()
            self._target_iter = None

    def _stop_requested(self) -> bool:
        flag = self._stop.requested
        if self.dist.enabled:
            t = torch.tensor([float(flag)], device=self.device if
                             dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t)
            flag = bool(t.item() > 0)
        return flag

    def _train_epoch(self) -> None:
        stage = self.stage
        _, local_epoch = self.stage_at(self.epoch)
        phase = Phase.for_epoch(local_epoch, self.run.phase_epoch, self.run.phase_epoch)
        self.phase = phase
        self.source_loader.set_epoch(local_epoch)
        sums: dict[str, float] = defaultdict(float)
        count, images, start = 0, 0, time.perf_counter()
        bar = None
        if self.run.progress and self.dist.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.iterations_per_epoch, initial=self.iteration,
                       desc=f"epoch {self.epoch + 1}/{self.total_epochs} {stage.name}",
                       unit="it", dynamic_ncols=True, leave=False)
        batches = iter(self.source_loader)
        try:
            while self.iteration < self.iterations_per_epoch:
                self._in_step = True
                batch = next(batches)
                x_s = batch.images.to(self.device, non_blocking=True)
                y_s = batch.pids.to(self.device, non_blocking=True)
                if stage.name == "reid":
                    log = self.step(x_s, y_s, self.optimizers["reid"])
                else:
                    x_t = self._next_target().to(self.device, non_blocking=True)
                    labels = y_s if stage.name == "joint" else None
                    log = self.step(x_s, labels, x_t, self.optimizers["G"],
                                    self.optimizers["D"], phase)
                self.iteration += 1
                self.global_step += 1
                self._in_step = False
                count += 1
                images += len(batch) * self.dist.world_size
                for k, v in log.items():
                    sums[k] += v
                    self._scalar(f"train/{k}", v, self.global_step)
                if bar is not None:
                    rate = images / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(self._postfix(log, rate), refresh=False)
                    bar.update(1)
                for hook in self.hooks:
                    hook.after_iteration(self, log)
                if self._stop_requested():
                    raise KeyboardInterrupt
        finally:
            batches.close()
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
        if count:
            means = {k: v / count for k, v in sums.items()}
            self.last_epoch_losses = means
            logger.info("epoch %d/%d %s: %s | %.0f img/s | lr %.2e | %s",
                        self.epoch + 1, self.total_epochs, stage.name,
                        self._postfix(means, None), images / max(seconds, 1e-9),
                        self.optimizers[next(iter(self.optimizers))].param_groups[0]["lr"],
                        "re-ID only" if stage.name == "reid" else
                        f"attention {'learning' if phase.train_attention else 'frozen'}, "
                        f"D on {'backgrounds' if phase.masked_discriminator else 'whole images'}")

    @staticmethod
    def _postfix(log: dict[str, float], rate: float | None) -> str:
        short = {"total": "loss", "cycle": "cyc", "attention": "attn", "metric": "met",
                 "id": "id", "d_total": "D"}
        parts = [f"{name}={log[k]:.3g}" for k, name in short.items() if k in log]
        if rate is not None:
            parts.append(f"{rate:.0f}img/s")
        return " ".join(parts)

    def _end_epoch(self) -> None:
        self._in_step = True
        self.epoch += 1
        self.iteration = 0
        for s in self.schedulers.values():
            s.step()
        self._in_step = False
        for k, opt in self.optimizers.items():
            self._scalar(f"lr/{k}", opt.param_groups[0]["lr"], self.epoch)
        final = self.epoch == self.total_epochs
        every = self.run.eval_every
        if every and self.epoch % every == 0 and not final:
            self._save_grid()
            self._record_attention()
            if self.stage.name != "translator":
                self._record_evaluation(self.evaluate())
        every = self.run.checkpoint_every
        if every and self.epoch % every == 0 and not final:
            self.save()
        for hook in self.hooks:
            hook.after_epoch(self)

    def fit(self) -> dict[str, Any]:
        """Train to the last epoch, evaluate, write checkpoints and the report; returns the
        report dict (``report.json``).

        Raises:
            TrainingInterrupted: on Ctrl-C / ``KeyboardInterrupt`` (after saving a checkpoint
                when the stop came between iterations).
            NonFiniteLossError: a loss term became NaN/inf (nothing was updated by it).
        """
        self._stop = _StopRequest()
        self._stop.install()
        self._start_time = time.perf_counter()
        self._finishing = False
        try:
            if self.dist.is_main:
                self._prepare_output_dir()
                self._write_config()
            self._open_writer()
            self._log_start()
            for hook in self.hooks:
                hook.before_train(self)
            while self.epoch < self.total_epochs:
                index, _ = self.stage_at(self.epoch)
                if index != self.stage_index:
                    self._enter_stage(index)
                self._train_epoch()
                self._end_epoch()
            self._finishing = True
            report = self._finish()
            for hook in self.hooks:
                hook.after_train(self, report)
            return report
        except KeyboardInterrupt as exc:
            if isinstance(exc, TrainingInterrupted):
                raise
            path = None if self._in_step else self.save()
            raise TrainingInterrupted(path, self.epoch, self.iteration,
                                      "the final evaluation" if self._finishing else None) \
                from None
        finally:
            self._stop.restore()
            self._close_target_iter()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if self._owns_group and dist.is_initialized():
                dist.destroy_process_group()
                self._owns_group = False

    def _prepare_output_dir(self) -> None:
        """Create the output folder; delete the replaced run's files (``overwrite``) and the
        temporaries of checkpoint writes that a killed process never finished."""
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunConfigError(f"output_dir {self.output_dir} cannot be created: "
                                 f"{exc.strerror or exc}") from None
        if self.overwrite:
            for name in OVERWRITTEN_FILES:
                (self.output_dir / name).unlink(missing_ok=True)
        for stale in remove_stale_temporaries(self.output_dir):
            logger.info("removed %s, left by an interrupted checkpoint write", stale)

    def _write_config(self) -> None:
        import yaml

        text = yaml.safe_dump(self.run.to_dict(), sort_keys=False)
        tmp = self.output_dir / f".config.yaml.tmp{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, self.output_dir / "config.yaml")

    def _log_start(self) -> None:
        run = self.run
        precision = {None: "float32", torch.bfloat16: "bfloat16 autocast",
                     torch.float16: "float16 autocast"}[self.precision]
        logger.info(
            "%s, %s: %d source images of %d identities, %d target images; preset %s %dx%d; "
            "stages %s; %d iterations per epoch; phase switch at epoch %d; %s on %s%s; "
            "output %s", method_name(run.to_dict()), transfer_name(run.to_dict()),
            len(self.source.train), self.source.num_train_pids, len(self.target.train),
            run.preset, run.image_size[0], run.image_size[1],
            " + ".join(f"{s.name} {s.epochs} epochs" for s in self.stages),
            self.iterations_per_epoch, run.phase_epoch, precision, self.device,
            f" x {self.dist.world_size} processes" if self.dist.enabled else "",
            self.output_dir)

    def _finish(self) -> dict[str, Any]:
        # From here to the checkpoint nothing of the training changes, so a first Ctrl-C
        # stops at once (one process; under DDP the ranks stop together after evaluating).
        self._stop.immediate = not self.dist.enabled
        if self._stop_requested():
            raise KeyboardInterrupt
        self._save_grid()
        self._record_attention()
        metrics = self.evaluate()
        if self._stop_requested():
            raise KeyboardInterrupt
        self._stop.immediate = False
        self._record_evaluation(metrics)
        self.save(CHECKPOINT_NAME)
        self.save(FINAL_NAME)
        report = build_report(self.run.to_dict(), metrics, self._elapsed(), self.total_epochs,
                              self.history)
        report["precision"] = {None: "float32", torch.bfloat16: "bfloat16",
                               torch.float16: "float16"}[self.precision]
        report["world_size"] = self.dist.world_size
        report["attention"] = self.attention
        if self.dist.is_main:
            json_path, md_path = write_report(self.output_dir, report)
            logger.info("report: %s, %s (%.0f s)", json_path, md_path, report["seconds"])
        return report


def train(run: RunConfig, *, hooks: Sequence[HookBase] = (),
          resume: str | os.PathLike | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train ``run`` (optionally resuming a checkpoint); returns the ``report.json`` payload.

    ``overwrite``: see :class:`Trainer`."""
    return Trainer(run, hooks=hooks, resume=resume, overwrite=overwrite).fit()
