"""What a stage of a variant is made of: the stages of each variant, the schedule rule, the
objective, and for one stage its freshly initialised model, optimisers (with their schedulers),
training step and training loaders; plus the hand-off between the two-stage variants' stages
(the saved translator and the translated source set it writes).

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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from edaan_fast.data import PKSampler, RandomBatchSampler, Record, ReIDDataset, build_loader
from edaan_fast.data.translated import (
    translated_complete,
    translated_records,
    write_translated_set,
)
from edaan_fast.losses import EDAANObjective, LossWeights, build_metric_loss
from edaan_fast.models import EDAAN, ModelConfig, model_config

from .checkpoint import (
    CheckpointError,
    ResumePoint,
    load_checkpoint,
    load_model_state,
    model_config_from_dict,
    model_config_to_dict,
    save_checkpoint,
)
from .distributed import (
    LOADER_STREAMS,
    DistInfo,
    GatheredMetricLoss,
    RankSlice,
    all_reduce_gradients,
    barrier,
    derive_seed,
    gather,
    set_rng_state,
)
from .execution import ExecutionOptions, prepare_model
from .mask_guidance import MaskGuidance
from .run_config import RUN_PRESETS, RunConfig, RunConfigError, resume_config
from .run_dir import TRANSLATED_DIR, TRANSLATOR_NAME
from .steps import EDAANTrainStep, ReIDStep

logger = logging.getLogger("edaan_fast.engine.trainer")

__all__ = ["BuiltStage", "LinearDecay", "RunParts", "Stage", "build_objective",
           "build_optimizers", "build_stage", "build_step", "check_batch_split",
           "check_resumable", "epoch_length", "new_model", "restore_stage", "run_model_config",
           "save_translator", "stage_records", "stages_of", "train_loader", "translate_source"]


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


class AttentionAnneal(LinearDecay):
    """The attention nets' factor: :class:`LinearDecay`, times a linear ramp to 0 over the last
    ``anneal_epochs`` epochs before the phase switch at ``phase_epoch`` (0-based epoch ``e`` in
    the ramp: ``(phase_epoch - e) / (anneal_epochs + 1)``), so that the maps frozen at the
    switch come from a settled net rather than a snapshot of a high-learning-rate walk."""

    def __init__(self, epochs: int, phase_epoch: int, anneal_epochs: int):
        super().__init__(epochs)
        self.phase_epoch, self.anneal_epochs = int(phase_epoch), int(anneal_epochs)

    def __call__(self, epoch: int) -> float:
        ramp = (self.phase_epoch - epoch) / (self.anneal_epochs + 1)
        return super().__call__(epoch) * min(1.0, max(0.0, ramp))


@dataclass(frozen=True)
class Stage:
    """One stage of a variant: ``joint`` (EDAAN), ``translator`` or ``reid``."""

    name: str
    epochs: int

    @property
    def translates(self) -> bool:
        """Trains the translator (generators, discriminators, attention) on target images."""
        return self.name != "reid"

    @property
    def labelled(self) -> bool:
        """Trains re-ID on source labels (and so is evaluated on the target)."""
        return self.name != "translator"


def stages_of(run: RunConfig) -> list[Stage]:
    if run.end_to_end:
        return [Stage("joint", run.epochs)]
    if run.translator:
        return [Stage("translator", run.epochs), Stage("reid", run.epochs)]
    return [Stage("reid", run.epochs)]


def build_objective(run: RunConfig, world_size: int = 1) -> EDAANObjective:
    """The loss of eq. (9) with the run's weights and metric loss (mined over the global batch
    when ``world_size`` > 1 processes each hold a slice of it)."""
    metric_loss = build_metric_loss(run.metric_loss, run.margin)
    if world_size > 1:
        metric_loss = GatheredMetricLoss(metric_loss)
    return EDAANObjective(
        metric_loss,
        LossWeights(gan=run.lambda_gan, cycle=run.lambda_cyc, attention=run.lambda_attn,
                    metric=run.lambda_metric, attention_tv=run.lambda_tv, id=run.lambda_id,
                    attention_area=run.lambda_area, area_budget=run.area_budget,
                    mask_guidance=run.mask_guidance),
        label_smoothing=run.label_smoothing, attention_consistency=run.attention_consistency,
        binary_mask=run.binary_mask)


def run_model_config(run: RunConfig, num_ids: int) -> ModelConfig:
    """The model of a run: its preset with the run's image size, identities, attention and
    ``model`` overrides."""
    try:
        return model_config(RUN_PRESETS[run.preset].model, image_size=tuple(run.image_size),
                            num_ids=num_ids, no_attention=not run.attention,
                            **{"reid_attention_grad": run.reid_attention_grad, **run.model})
    except (TypeError, ValueError) as exc:
        raise RunConfigError(f"model configuration: {exc}") from None


def new_model(config: ModelConfig, run: RunConfig, device: torch.device, salt: int) -> EDAAN:
    """A freshly initialised model, seeded from ``(seed, salt)`` without touching the global
    RNG stream (so a resumed run and a straight run draw the same numbers)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed * 1000 + salt)
        model = EDAAN(config)
    model.to(device)
    return prepare_model(model, ExecutionOptions(compile=run.compile))


def _generator_groups(model: EDAAN, run: RunConfig):
    """The generator optimiser's parameters: one group, or the attention nets in a group of
    their own when ``attention_lr_scale`` is not 1 (their learning rate is
    ``lr * attention_lr_scale``) or their learning rate is annealed (``attention_anneal``)."""
    scale = run.attention_lr_scale
    if (scale == 1.0 and not run.attention_anneal) or not model.has_attention:
        return model.generator_parameters()
    nets = [p for net in model.attention_nets() for p in net.parameters()]
    attention = {id(p) for p in nets}
    rest = [p for p in model.generator_parameters() if id(p) not in attention]
    return [{"params": rest}, {"params": nets, "lr": run.lr * scale}]


def build_optimizers(stage: Stage, model: EDAAN, run: RunConfig, *, fused: bool = True):
    """``(optimizers, schedulers)`` of a stage, by name: ``G`` and ``D`` for a stage that
    translates, ``reid`` (``E_S`` + re-ID head) otherwise; Adam with the :class:`LinearDecay`
    schedule over the stage's epochs, in one fused kernel per step unless ``fused`` is off
    (:mod:`.execution`)."""
    def adam(params):
        return torch.optim.Adam(params, lr=run.lr, betas=(run.beta1, run.beta2),
                                fused=True if fused else None)

    if stage.translates:
        optimizers = {"G": adam(_generator_groups(model, run)),
                      "D": adam(model.discriminator_parameters())}
    else:
        optimizers = {"reid": adam(chain(model.encoder_S.parameters(),
                                         model.reid_head.parameters()))}
    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, _schedule(k, o, stage, run))
                  for k, o in optimizers.items()}
    return optimizers, schedulers


def _schedule(name: str, optimizer: torch.optim.Optimizer, stage: Stage, run: RunConfig):
    """:class:`LinearDecay`; with ``attention_anneal`` the attention group of ``G`` (the last)
    follows :class:`AttentionAnneal` over the last fraction of the epochs before the switch."""
    if name != "G" or not run.attention_anneal or len(optimizer.param_groups) < 2:
        return LinearDecay(stage.epochs)
    anneal = max(1, round(run.attention_anneal * run.phase_epoch))
    return [LinearDecay(stage.epochs)] * (len(optimizer.param_groups) - 1) + [
        AttentionAnneal(stage.epochs, run.phase_epoch, anneal)]


def build_step(stage: Stage, model: EDAAN, objective: EDAANObjective, run: RunConfig,
               precision: torch.dtype | None, dist: DistInfo, guide: MaskGuidance | None = None):
    """The stage's training step (both kinds take :meth:`~EDAANTrainStep.run_batch`); a
    translating stage takes the run's mask ``guide`` (``--mask-guidance``)."""
    sync = all_reduce_gradients if dist.enabled else None
    amp = dict(amp=precision is not None, amp_dtype=precision, gradient_sync=sync)
    if stage.translates:
        return EDAANTrainStep(model, objective, pool_size=run.pool_size,
                              seed=run.seed + 7919 * dist.rank, guide=guide, **amp)
    return ReIDStep(model, objective, **amp)


def check_batch_split(run: RunConfig, world_size: int) -> None:
    """Raise unless the ``P`` identities of a PK batch split evenly over the processes."""
    if run.num_identities_per_batch % world_size:
        raise RunConfigError(
            f"batch_size {run.batch_size} with num_instances {run.num_instances} gives "
            f"{run.num_identities_per_batch} identities per batch, which do not split evenly "
            f"over {world_size} processes")


def train_loader(records: Sequence[Record], sampler, run: RunConfig, dist: DistInfo,
                 device: torch.device, num_workers: int, stream: str = "source"):
    """A training loader over ``records``; under a process group, each rank's slice. Its
    augmentation is seeded per ``stream`` (``"source"`` / ``"target"``) and rank
    (:func:`~edaan_fast.engine.distributed.derive_seed`); the sampler keeps its own seed."""
    if dist.enabled:
        sampler = RankSlice(sampler, dist.rank, dist.world_size)
    return build_loader(records, loader=run.loader, train=True, sampler=sampler,
                        num_workers=num_workers, image_size=tuple(run.image_size),
                        seed=derive_seed(run.seed, dist.rank, LOADER_STREAMS[stream]),
                        pad=run.pad, flip_p=run.flip_p, pin_memory=device.type == "cuda",
                        device=device)


def translate_source(model: EDAAN | Path, records: Sequence[Record], folder: Path,
                     run: RunConfig, device: torch.device, num_workers: int) -> None:
    """Write the translated source set with ``model`` (or the translator saved at that
    path) for the re-ID stage of a two-stage variant."""
    if isinstance(model, Path):
        ckpt = load_checkpoint(model, kind="model")
        where = f"checkpoint {model}"
        translator = EDAAN(model_config_from_dict(ckpt["model_config"], where))
        load_model_state(translator, ckpt["model"], where)
        logger.info("regenerating the translated source set from %s", model)
        model = translator.to(device)
    write_translated_set(model, records, folder, image_size=tuple(run.image_size),
                         device=device, batch_size=run.eval_batch_size,
                         num_workers=num_workers, loader=run.loader, progress=run.progress)


def check_resumable(ckpt: dict[str, Any], path: Path, run: RunConfig, config: ModelConfig,
                    stages: Sequence[Stage], world_size: int) -> None:
    """Raise unless the training checkpoint ``ckpt`` continues ``run``: the same options
    (:func:`~edaan_fast.engine.run_config.resume_config`), number of processes and model, and
    a stage and epoch that exist in the run."""
    where = f"checkpoint {path}"
    resume_config(ckpt["run"], {k: v for k, v in run.to_dict().items()
                                if k not in RunConfig.DERIVED})
    if len(ckpt["ranks"]) != world_size:
        raise CheckpointError(
            f"{path} was written by {len(ckpt['ranks'])} process(es); resume it with the "
            f"same number (this run has {world_size})")
    mine = model_config_to_dict(config)
    if mine != ckpt["model_config"]:
        differ = ", ".join(f"{k} {ckpt['model_config'].get(k)!r} there, {mine.get(k)!r} here"
                           for k in sorted(set(mine) | set(ckpt["model_config"]))
                           if mine.get(k) != ckpt["model_config"].get(k))
        raise CheckpointError(f"{path}: its model differs from this run's ({differ})")
    if ckpt["stage"] >= len(stages):
        raise CheckpointError(
            f"{where}: stage {ckpt['stage']} does not exist in a {run.variant} run "
            f"(stages {', '.join(f'{i} {s.name}' for i, s in enumerate(stages))})")
    if ckpt["epoch"] > sum(s.epochs for s in stages):
        raise CheckpointError(f"{where}: epoch {ckpt['epoch']} is past the run's "
                              f"{sum(s.epochs for s in stages)} epochs")


def stage_records(stage: Stage, run: RunConfig, source: Sequence[Record], output_dir: Path,
                  dist: DistInfo, device: torch.device, num_workers: int) -> list[Record]:
    """What a stage trains on: the real source images, or for the re-ID stage of a two-stage
    variant the translated set (with or without the real images), regenerated from the saved
    translator when it is missing (rank 0 writes; every rank waits)."""
    if stage.translates or run.reid_data == "real":
        return list(source)
    folder = output_dir / TRANSLATED_DIR
    # rank 0's view decides, so that every rank takes the same (collective) path
    if not gather(dist, translated_complete(source, folder))[0]:
        if dist.is_main:
            translate_source(output_dir / TRANSLATOR_NAME, source, folder, run, device,
                             num_workers)
        barrier(dist)
    translated = translated_records(source, folder)
    if run.reid_data == "translated":
        return translated
    return list(source) + translated


def save_translator(model: EDAAN, config: ModelConfig, epoch: int, run: RunConfig,
                    source: Sequence[Record], output_dir: Path, device: torch.device,
                    num_workers: int) -> None:
    """The end of a translator stage (rank 0): ``translator.pt``, then the translated source
    set unless the re-ID stage trains on real images only."""
    save_checkpoint(output_dir / TRANSLATOR_NAME, {
        "model_config": model_config_to_dict(config), "model": model.state_dict(),
        "epoch": epoch, "run": run.to_dict()})
    if run.reid_data != "real":
        logger.info("writing the translated source set (%d images) to %s", len(source),
                    output_dir / TRANSLATED_DIR)
        translate_source(model, source, output_dir / TRANSLATED_DIR, run, device, num_workers)


def epoch_length(run: RunConfig, stage: Stage, batches: int, images: int) -> int:
    """Iterations per epoch: one pass of the PK sampler, or ``iters_per_epoch`` (no more); by
    default the preset's cap where it has one and the pass is longer."""
    if run.iters_per_epoch is None:
        cap = RUN_PRESETS[run.preset].iters_per_epoch
        return batches if cap is None else min(cap, batches)
    if run.iters_per_epoch > batches:
        raise RunConfigError(
            f"iters_per_epoch={run.iters_per_epoch} exceeds the {batches} PK batches of one "
            f"pass over the {stage.name} stage's {images} images")
    return run.iters_per_epoch


def restore_stage(ckpt: dict[str, Any], rank: int, where: str, optimizers: dict,
                  schedulers: dict, step, source_loader, target_loader,
                  device: torch.device) -> None:
    """Load a training checkpoint's optimiser, scheduler, step, sampler and RNG states into a
    freshly built stage (the RNG last: nothing after it may draw random numbers)."""
    if set(ckpt["optimizers"]) != set(optimizers) or set(ckpt["schedulers"]) != set(optimizers):
        raise CheckpointError(f"{where}: optimisers {sorted(ckpt['optimizers'])} do not fit "
                              f"the stage ({sorted(optimizers)})")
    mine = ckpt["ranks"][rank]
    part = "optimiser"
    try:  # the schema is checked; a state that still does not fit is named here
        for k, opt in optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][k])
            part = "scheduler"
            schedulers[k].load_state_dict(ckpt["schedulers"][k])
            part = "optimiser"
        part = "training step (image pools, grad scalers)"
        step.load_state_dict(mine["step"])
        step.pool_S.to(device)
        step.pool_T.to(device)
        part = "sampler"
        source_loader.load_state_dict(ckpt["sampler"]["source"])
        if target_loader is not None and ckpt["sampler"]["target"] is not None:
            target_loader.load_state_dict(ckpt["sampler"]["target"])
        part = "random number generator"
        set_rng_state(mine["rng"], device)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        text = str(exc).strip().splitlines()
        raise CheckpointError(f"{where}: its {part} state cannot be restored "
                              f"({type(exc).__name__}: {text[0] if text else ''})") from None


@dataclass
class RunParts:
    """What every stage of one run shares; the trainer builds it once."""

    run: RunConfig
    dist: DistInfo
    device: torch.device
    precision: torch.dtype | None
    num_workers: int
    source: ReIDDataset
    target: ReIDDataset
    output_dir: Path
    model_config: ModelConfig
    objective: EDAANObjective
    stages: list[Stage]
    guide: MaskGuidance | None = None


@dataclass
class BuiltStage:
    """One stage, complete: what :func:`build_stage` returns and the trainer's loop runs."""

    index: int
    spec: Stage
    model: EDAAN
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    step: EDAANTrainStep | ReIDStep
    source_loader: Any
    target_loader: Any | None
    iterations_per_epoch: int


def build_stage(parts: RunParts, index: int, resume: ResumePoint | None = None) -> BuiltStage:
    """Stage ``index`` of the run, complete: a freshly initialised model, its optimisers and
    schedulers, the training step, the source (and, for a translating stage, target) loaders
    and the epoch length, with the translated source set regenerated first where a re-ID
    stage needs it and it is missing. With ``resume`` (a training checkpoint, checked first
    against the run: :func:`check_resumable`) the model, optimiser, scheduler, step, sampler
    and RNG states come from it."""
    run, dist = parts.run, parts.dist
    if resume is not None:
        check_resumable(resume.checkpoint, resume.path, run, parts.model_config, parts.stages,
                        dist.world_size)
    stage = parts.stages[index]
    model = new_model(parts.model_config, run, parts.device, salt=index)
    optimizers, schedulers = build_optimizers(stage, model, run)
    step = build_step(stage, model, parts.objective, run, parts.precision, dist, parts.guide)
    records = stage_records(stage, run, parts.source.train, parts.output_dir, dist,
                            parts.device, parts.num_workers)
    pk = PKSampler(records, run.num_identities_per_batch, run.num_instances, seed=run.seed)
    source_loader = train_loader(records, pk, run, dist, parts.device, parts.num_workers)
    iterations = epoch_length(run, stage, len(source_loader), len(records))
    target_loader = None
    if step.uses_target:
        target = RandomBatchSampler(len(parts.target.train), run.batch_size, seed=run.seed + 1)
        target_loader = train_loader(parts.target.train, target, run, dist, parts.device,
                                     parts.num_workers, stream="target")
    if resume is not None:
        where = f"checkpoint {resume.path}"
        load_model_state(model, resume.checkpoint["model"], where)
        restore_stage(resume.checkpoint, dist.rank, where, optimizers, schedulers, step,
                      source_loader, target_loader, parts.device)
    return BuiltStage(index, stage, model, optimizers, schedulers, step, source_loader,
                      target_loader, iterations)
