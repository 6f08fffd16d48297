"""The EDAAN training loop: stages, model, optimisers, the loop itself, checkpoint state,
resume and the final report; everything around the loop is a hook (:mod:`.hooks`).

:class:`Trainer` owns what a run needs around the per-iteration step (:mod:`.steps`): the
data (PK-sampled source batches, random target batches), the model, the optimisers and their
schedule, and the state a checkpoint holds. Evaluation plan: :mod:`.targets`; output folder:
:mod:`.run_dir`; schedule and variants: :mod:`.stages`; phase switch: :mod:`.hooks`; ``amp``
dtype: :mod:`.precision`; ``torchrun``: :mod:`.distributed`.

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

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from edaan_fast.data.person_masks import read_manifest
from edaan_fast.evaluation.evaluator import evaluate_attention
from edaan_fast.evaluation.report import build_report, metrics_dict, write_report
from edaan_fast.evaluation.targets import evaluate_target

from .checkpoint import ResumePoint, model_config_to_dict, save_checkpoint
from .distributed import (
    barrier,
    derive_seed,
    gather,
    init_distributed,
    resolve_device,
    rng_state,
    seed_everything,
)
from .hooks import (
    HookBase,
    StopRequest,
    TrainingInterrupted,
    default_hooks,
    record_attention,
    record_evaluation,
    write_image_grid,
)
from .mask_guidance import MaskGuidance
from .precision import PRECISION_NAMES, resolve_precision
from .run_config import RunConfig, source_dataset, target_dataset
from .run_dir import CHECKPOINT_NAME, FINAL_NAME, check_output_dir, prepare_output_dir, write_config
from .run_guard import (
    check_data_change, defer_worker_deaths, lock_run_folder, run_data_digest, screen_images,
    stop_on_failure,
)
from .stages import (
    BuiltStage,
    RunParts,
    Stage,
    build_objective,
    build_stage,
    check_batch_split,
    run_model_config,
    save_translator,
    stages_of,
)
from .steps import Phase

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "train"]


class Trainer:
    """Trains one run (see the module docstring); :meth:`fit` returns the report dict.

    Args:
        run: the run configuration (resolved here).
        hooks: :class:`HookBase` instances, run after the built-in ones.
        resume: a checkpoint (path, or a :class:`ResumePoint` already read) written by a run
            of the same configuration (see :func:`resume_config`) to continue from.
        overwrite: let a fresh run replace the run in ``output_dir`` (its checkpoints and
            report are deleted when training starts). Without it, a fresh run into a folder
            that holds ``checkpoint.pt``, ``final.pt`` or ``translator.pt`` is refused, and so
            is resuming into such a folder from a checkpoint kept elsewhere.
        allow_data_change: resume on data that differ from the checkpoint's (its data
            digest, :mod:`.run_guard`); refused without it.

    Raises:
        RunConfigError: an invalid configuration, or one that does not match ``resume``; an
            output folder that is a file or holds another run (see ``overwrite``).
        CheckpointError: ``resume`` is missing, truncated, foreign, or holds weights only.
        DatasetError: a data set is missing or malformed.
    """

    def __init__(self, run: RunConfig, *, hooks: Sequence[HookBase] = (),
                 resume: str | os.PathLike | ResumePoint | None = None, overwrite: bool = False,
                 allow_data_change: bool = False):
        self.run = run.resolve()
        if resume is not None and not isinstance(resume, ResumePoint):
            resume = ResumePoint.read(resume)  # the schema: entries and their types
        resume_path = getattr(resume, "path", None)
        self._stop = StopRequest()
        self.hooks = [*default_hooks(), *hooks, self._stop]
        self.output_dir = Path(self.run.output_dir)
        self.overwrite = bool(overwrite) and resume is None
        self._resume_path, self._overwrite_given = resume_path, bool(overwrite)
        # a resume checks the folder's run after the checkpoint: its errors come first
        check_output_dir(self.output_dir, resume_path, overwrite, runs=resume is None)
        self.dist, self._owns_group = init_distributed(self.run.device)
        self.device = resolve_device(self.run.device, self.dist)
        torch.backends.cudnn.benchmark |= self.device.type == "cuda"  # one fixed input size
        self.precision = resolve_precision(self.run.amp, self.run.amp_dtype, self.device.type,
                                           cpu_fallback=True)
        self.num_workers = (self.run.num_workers if self.run.num_workers is not None
                            else (0 if self.device.type == "cpu" else 4))
        self.source = source_dataset(self.run.to_dict())
        self.target = target_dataset(self.run.to_dict())
        self.source, self.target, self.bad_images = screen_images(self.source, self.target,
                                                                  self.run.bad_images)
        self.data_digest = run_data_digest(self.source, self.target)
        self.allow_data_change = bool(allow_data_change)
        self.person_masks = {net: folder for net, folder in (
            ("A_S", self.run.source_person_masks), ("A_T", self.run.target_person_masks))
            if folder is not None}
        for folder in self.person_masks.values():
            read_manifest(folder)  # a wrong folder is named now, not at the first evaluation
        check_batch_split(self.run, self.dist.world_size)
        self.model_config = run_model_config(self.run, self.source.num_train_pids)
        self.objective = build_objective(self.run, self.dist.world_size)
        self.stages = stages_of(self.run)
        guide = (MaskGuidance(self.source.train, self.target.train, self.run.source_person_masks,
                              self.run.target_person_masks, self.run.image_size,
                              self.run.batch_size // 2, self.run.seed)
                 if self.run.mask_guidance > 0 else None)
        self.parts = RunParts(self.run, self.dist, self.device, self.precision, self.num_workers,
                              self.source, self.target, self.output_dir, self.model_config,
                              self.objective, self.stages, guide)
        self.total_epochs = sum(s.epochs for s in self.stages)
        self.epoch = self.iteration = self.global_step = 0  # epochs over all stages
        self.history: list[dict[str, Any]] = []
        self.attention: dict[str, Any] | None = None  # latest attention quality
        self.elapsed_before, self.stage_index, self.batch_images = 0.0, -1, 0
        self.phase, self._in_step = Phase(), False
        self.writer = self._target_iter = self.probe = None
        seed_everything(derive_seed(self.run.seed, self.dist.rank))
        if resume is not None:
            self._resume(resume)
            check_output_dir(self.output_dir, resume_path, overwrite)
        else:
            self._build_stage(0)

    # ------------------------------------------------------------------ setup

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

    def _build_stage(self, index: int, resume: ResumePoint | None = None) -> None:
        """Make stage ``index`` (:func:`~edaan_fast.engine.stages.build_stage`; from
        ``resume`` when given) the current one."""
        self._close_target_iter()
        built: BuiltStage = build_stage(self.parts, index, resume)
        self.stage_index, self.model, self.step = index, built.model, built.step
        self.optimizers, self.schedulers = built.optimizers, built.schedulers
        self.source_loader, self.target_loader = built.source_loader, built.target_loader
        self.iterations_per_epoch = built.iterations_per_epoch

    def _enter_stage(self, index: int) -> None:
        """Move to stage ``index``; after a translator stage, save the translator and write
        the translated source set first."""
        if self.stage.translates and not self.stages[index].translates:
            record_attention(self)
            if self.dist.is_main:
                save_translator(self.model, self.model_config, self.epoch, self.run,
                                self.source.train, self.output_dir, self.device,
                                self.num_workers)
            barrier(self.dist)
        self._build_stage(index)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint payload (see the module docstring); collective under DDP."""
        ranks = gather(self.dist, {"rng": rng_state(self.device),
                                   "step": self.step.state_dict()})
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
            "data": self.data_digest,
        }

    def save(self, name: str = CHECKPOINT_NAME) -> Path:
        """Write the checkpoint (rank 0; every rank must call this under DDP)."""
        state = self.state_dict()
        path = self.output_dir / name
        if self.dist.is_main:
            save_checkpoint(path, state)
            logger.info("checkpoint: %s (epoch %d, iteration %d)", path, self.epoch,
                        self.iteration)
        barrier(self.dist)
        return path

    def _resume(self, point: ResumePoint) -> None:
        ckpt = point.checkpoint
        check_data_change(ckpt, self.data_digest, point.path, self.allow_data_change)
        self._build_stage(int(ckpt["stage"]), resume=point)  # checks the checkpoint first
        self.epoch = int(ckpt["epoch"])
        self.iteration = int(ckpt.get("iteration", 0))
        self.global_step = int(ckpt.get("global_step", 0))
        self.history = list(ckpt.get("metrics", {}).get("history", []))
        self.attention = ckpt.get("metrics", {}).get("attention")
        self.elapsed_before = float(ckpt.get("elapsed", 0.0))
        logger.info("resumed %s at epoch %d, iteration %d (%s stage)", point.path, self.epoch,
                    self.iteration, self.stage.name)

    # ------------------------------------------------------------------ evaluation

    def scalar(self, tag: str, value: float, step: int) -> None:
        """A TensorBoard scalar (when the writer is open)."""
        if self.writer is not None and value is not None:
            self.writer.add_scalar(tag, value, step)

    def evaluate(self) -> dict[str, float | None]:
        """Target metrics of the current model (rank 0 computes; every rank gets them)."""
        metrics = None
        if self.dist.is_main:
            result = evaluate_target(self.model, self.run.to_dict(), self.target,
                                     device=self.device, batch_size=self.run.eval_batch_size,
                                     num_workers=self.num_workers)
            metrics = metrics_dict(result)
        return gather(self.dist, metrics)[0]

    def measure_attention(self) -> dict[str, Any] | None:
        """Attention quality of ``A_S`` / ``A_T`` on the held-out test images of each domain
        (:func:`~edaan_fast.evaluation.evaluator.evaluate_attention`; rank 0 computes, every rank
        gets it), or ``None`` when the current stage trains no attention nets."""
        if not self.stage.translates or not self.model.has_attention:
            return None
        result = None
        if self.dist.is_main:
            # a set without test images (one's own source set may have none): its training ones
            held_out = {net: (ds.query + ds.gallery) or ds.train
                        for net, ds in (("A_S", self.source), ("A_T", self.target))}
            q = evaluate_attention(
                self.model, held_out,
                image_size=tuple(self.run.image_size), device=self.device,
                batch_size=self.run.eval_batch_size, person_masks=self.person_masks)
            result = {"epoch": self.epoch, **{k: v.to_dict() for k, v in q.items()}}
        return gather(self.dist, result)[0]

    # ------------------------------------------------------------------ the loop

    def _call(self, event: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

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

    def _run_step(self, batch) -> dict[str, float]:
        x_s = batch.images.to(self.device, non_blocking=True)
        labels = batch.pids.to(self.device, non_blocking=True) if self.stage.labelled else None
        x_t = (self._next_target().to(self.device, non_blocking=True)
               if self.step.uses_target else None)
        return self.step.run_batch(x_s, labels, x_t, self.optimizers, self.phase)

    def _train_epoch(self) -> None:
        self.source_loader.set_epoch(self.stage_at(self.epoch)[1])
        self._call("before_epoch")
        batches = iter(self.source_loader)
        try:
            while self.iteration < self.iterations_per_epoch:
                self._in_step = True
                batch = next(batches)
                log = self._run_step(batch)
                self.iteration += 1
                self.global_step += 1
                self._in_step = False
                self.batch_images = len(batch) * self.dist.world_size
                self._call("after_iteration", log)
        finally:
            batches.close()
        self._in_step = True  # the epoch count and its hooks' state advance together
        self.epoch += 1
        self.iteration = 0
        self._call("end_epoch")
        self._in_step = False
        self._call("after_epoch")

    def fit(self) -> dict[str, Any]:
        """Train to the last epoch, evaluate, write checkpoints and the report; returns the
        report dict (``report.json``).

        Raises:
            TrainingInterrupted: on Ctrl-C / ``KeyboardInterrupt`` (after saving a checkpoint
                when the stop came between iterations).
            NonFiniteLossError: a loss term became NaN/inf (nothing was updated by it).
            DatasetError, LoaderFailure: a data file, a loader worker or the DALI pipeline
                failed mid-run; a checkpoint was written first where the state was whole
                (:func:`~.run_guard.stop_on_failure`).
            OutputBusyError: another process holds the output folder's lock.
        """
        self._start_time = time.perf_counter()
        self._finishing = False
        lock = None
        try:
            self._stop.before_train(self)  # Ctrl-C is handled from the first moment on
            defer_worker_deaths()  # a dead loader worker is found where a checkpoint can follow
            if self.dist.is_main:
                lock = lock_run_folder(self.output_dir, self._resume_path, self._overwrite_given)
                prepare_output_dir(self.output_dir, self.overwrite)
                write_config(self.output_dir, self.run.to_dict())
            for hook in self.hooks[:-1]:
                hook.before_train(self)
            while self.epoch < self.total_epochs:
                index, _ = self.stage_at(self.epoch)
                if index != self.stage_index:
                    self._enter_stage(index)
                self._train_epoch()
            self._finishing = True
            report = self._finish()
            self._call("after_train", report)
            return report
        except KeyboardInterrupt as exc:
            if isinstance(exc, TrainingInterrupted):
                raise
            during = "the final evaluation" if self._finishing else None
            try:
                path = None if self._in_step else self.save()
            except KeyboardInterrupt:  # a second Ctrl-C while writing: the write is dropped
                path, during = None, "the checkpoint write"
            raise TrainingInterrupted(path, self.epoch, self.iteration, during,
                                      self._stop.signum) from None
        except Exception as exc:  # a data file, a loader worker or the DALI pipeline failed?
            failure = stop_on_failure(self, exc)
            if failure is None:
                raise
            raise failure from None
        finally:
            self._call("close")
            self._close_target_iter()
            if lock is not None:
                lock.release()
            if self._owns_group and dist.is_initialized():
                dist.destroy_process_group()
                self._owns_group = False

    def _elapsed(self) -> float:
        start = getattr(self, "_start_time", None)
        return self.elapsed_before + (time.perf_counter() - start if start is not None else 0.0)

    def _finish(self) -> dict[str, Any]:
        # From here to the checkpoint nothing of the training changes, so a first Ctrl-C
        # stops at once (one process; under DDP the ranks stop together after evaluating).
        self._stop.immediate = not self.dist.enabled
        if self._stop.any_rank(self):
            raise KeyboardInterrupt
        write_image_grid(self)
        record_attention(self)
        metrics = self.evaluate()
        if self._stop.any_rank(self):
            raise KeyboardInterrupt
        self._stop.immediate = False
        record_evaluation(self, metrics)
        self.save(CHECKPOINT_NAME)
        self.save(FINAL_NAME)
        report = build_report(self.run.to_dict(), metrics, self._elapsed(), self.total_epochs,
                              self.history)
        report.update(precision=PRECISION_NAMES[self.precision], world_size=self.dist.world_size,
                      bad_images=self.bad_images,
                      attention_quality=self.attention, peak_gpu_memory_mib=(
                          torch.cuda.max_memory_allocated(self.device) / 2 ** 20
                          if self.device.type == "cuda" else None))
        if self.dist.is_main:
            json_path, md_path = write_report(self.output_dir, report)
            logger.info("report: %s, %s (%.0f s)", json_path, md_path, report["seconds"])
        return report


def train(run: RunConfig, *, hooks: Sequence[HookBase] = (),
          resume: str | os.PathLike | ResumePoint | None = None,
          overwrite: bool = False, allow_data_change: bool = False) -> dict[str, Any]:
    """Train ``run`` (optionally resuming a checkpoint); returns the ``report.json`` payload.

    ``overwrite``, ``allow_data_change``: see :class:`Trainer`."""
    return Trainer(run, hooks=hooks, resume=resume, overwrite=overwrite,
                   allow_data_change=allow_data_change).fit()
