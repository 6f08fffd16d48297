"""The trainer's hooks (fast-reid's pattern): everything around the loop that is not the loop.

:class:`HookBase` lists the events. :func:`default_hooks` registers, in this order, the phase
switch (attention freeze, masked discriminators), the learning-rate schedule, TensorBoard, the
progress bar and epoch summary, and the periodic image grid, attention measurement, target
evaluation and checkpoint; the caller's hooks follow, and the stop request (Ctrl-C) comes last,
so that a hook that raises ``KeyboardInterrupt`` in ``after_iteration`` stops training exactly
as Ctrl-C does. The final evaluation and checkpoint are the trainer's own end of training.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from edaan_fast._progress import progress_bar, progress_wanted
from edaan_fast.data import build_loader
from edaan_fast.data.transforms import to_unit_range
from edaan_fast.evaluation.report import method_name, transfer_name
from edaan_fast.metrics import AttentionQuality

from .distributed import StopPoll, any_rank
from .precision import PRECISION_NAMES
from .signals import STOP_SIGNALS, signal_name
from .steps import Phase

#: The :class:`~edaan_fast.engine.trainer.Trainer` that calls the hooks (not imported here:
#: the trainer imports this module).
Trainer = Any

logger = logging.getLogger("edaan_fast.engine.trainer")

__all__ = ["AttentionMeasurement", "Checkpointing", "HookBase", "ImageGrid", "LRSchedule",
           "PhaseSwitch", "Progress", "StopRequest", "TargetEvaluation", "TensorBoard",
           "TrainingInterrupted", "default_hooks", "record_attention", "record_evaluation",
           "write_image_grid"]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C (or a ``KeyboardInterrupt`` from a hook).

    Attributes:
        checkpoint: the checkpoint written at the interruption, or ``None`` if the stop came
            in the middle of an iteration (a second Ctrl-C) and nothing was written.
        epoch: completed epochs; iteration: completed iterations of the current epoch.
    """

    def __init__(self, checkpoint: Path | None, epoch: int, iteration: int,
                 during: str | None = None, signum: int = signal.SIGINT):
        self.checkpoint, self.epoch, self.iteration = checkpoint, epoch, iteration
        self.signum = int(signum)  # the exit status: signals.exit_status(signum)
        where = f"epoch {epoch + 1}, iteration {iteration}"
        at = f"during {during} (after {epoch} epochs)" if during else f"at {where}"
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal_name(signum)}"
        if checkpoint is not None:
            msg = (f"training {how} {at}; checkpoint saved to {checkpoint}; continue "
                   f"with --resume {checkpoint}")
        else:
            when = f"during {during}" if during else "in the middle of an iteration"
            msg = (f"training {how} {when} ({where}); nothing was written, the last "
                   "periodic checkpoint (if any) is intact")
        super().__init__(msg)


class HookBase:
    """Callbacks of :class:`~edaan_fast.engine.trainer.Trainer`; override what you need.

    Hooks run on every rank; one that raises ``KeyboardInterrupt`` in ``after_iteration``
    stops training at that iteration exactly as Ctrl-C does (checkpoint, then
    :class:`~edaan_fast.engine.trainer.TrainingInterrupted`). ``end_epoch`` runs together
    with the epoch counter's advance (a checkpoint never sees one without the other);
    ``close`` runs when training ends, however it ends.
    """

    def before_train(self, trainer: Trainer) -> None: ...

    def before_epoch(self, trainer: Trainer) -> None: ...

    def after_iteration(self, trainer: Trainer, log: dict[str, float]) -> None: ...

    def end_epoch(self, trainer: Trainer) -> None: ...

    def after_epoch(self, trainer: Trainer) -> None: ...

    def after_train(self, trainer: Trainer, report: dict[str, Any]) -> None: ...

    def close(self, trainer: Trainer) -> None: ...


def _due(trainer: Trainer, every: int) -> bool:
    """Periodic work after this epoch: every ``every`` epochs, not after the last (the end of
    training does its own)."""
    return bool(every) and trainer.epoch % every == 0 and trainer.epoch != trainer.total_epochs


class PhaseSwitch(HookBase):
    """The paper's phase switch (§IV-B): until the phase epoch the attention nets learn and the
    discriminators see whole images; from it on the attention nets are frozen and the
    discriminators see backgrounds only (``trainer.phase``)."""

    def before_epoch(self, trainer):
        _, local_epoch = trainer.stage_at(trainer.epoch)
        trainer.phase = Phase.for_epoch(local_epoch, trainer.run.phase_epoch,
                                        trainer.run.phase_epoch, trainer.run.attention_refine)


class LRSchedule(HookBase):
    """Steps the stage's schedulers at every epoch's end; logs the learning rates."""

    def end_epoch(self, trainer):
        for s in trainer.schedulers.values():
            s.step()

    def after_epoch(self, trainer):
        for k, opt in trainer.optimizers.items():
            trainer.scalar(f"lr/{k}", opt.param_groups[0]["lr"], trainer.epoch)


class TensorBoard(HookBase):
    """``<output-dir>/tensorboard``: every logged term per iteration (rank 0)."""

    def before_train(self, trainer):
        if not trainer.dist.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("tensorboard is not installed: no TensorBoard scalars "
                           "(pip install tensorboard)")
            return
        trainer.writer = SummaryWriter(str(trainer.output_dir / "tensorboard"),
                                       purge_step=trainer.global_step or None)

    def after_iteration(self, trainer, log):
        for k, v in log.items():
            trainer.scalar(f"train/{k}", v, trainer.global_step)

    def close(self, trainer):
        if trainer.writer is not None:
            trainer.writer.close()
            trainer.writer = None


def postfix(log: dict[str, float], rate: float | None) -> str:
    short = {"total": "loss", "cycle": "cyc", "attention": "attn", "metric": "met",
             "id": "id", "guide": "guide", "d_total": "D"}
    optional = {"guide"}  # shown while non-zero (--mask-guidance, while the maps learn)
    parts = [f"{name}={log[k]:.3g}" for k, name in short.items()
             if k in log and (k not in optional or log[k])]
    if rate is not None:
        parts.append(f"{rate:.0f}img/s")
    return " ".join(parts)


class Progress(HookBase):
    """The run's opening log line, the progress bar (``run.progress``, rank 0) and the
    one-line summary of each epoch."""

    def __init__(self):
        self.bar = None

    def before_train(self, trainer):
        run = trainer.run
        logger.info(
            "%s, %s: %d source images of %d identities, %d target images; preset %s %dx%d; "
            "stages %s; %d iterations per epoch; phase switch at epoch %d; %s on %s%s; "
            "output %s", method_name(run.to_dict()), transfer_name(run.to_dict()),
            len(trainer.source.train), trainer.source.num_train_pids, len(trainer.target.train),
            run.preset, run.image_size[0], run.image_size[1],
            " + ".join(f"{s.name} {s.epochs} epochs" for s in trainer.stages),
            trainer.iterations_per_epoch, run.phase_epoch,
            "float32" if trainer.precision is None else
            f"{PRECISION_NAMES[trainer.precision]} autocast", trainer.device,
            f" x {trainer.dist.world_size} processes" if trainer.dist.enabled else "",
            trainer.output_dir)

    def before_epoch(self, trainer):
        self.sums: dict[str, float] = defaultdict(float)
        self.count, self.images, self.start = 0, 0, time.perf_counter()
        self.lr = trainer.optimizers[next(iter(trainer.optimizers))].param_groups[0]["lr"]
        if trainer.run.progress and trainer.dist.is_main and progress_wanted():
            self.bar = progress_bar(total=trainer.iterations_per_epoch, initial=trainer.iteration,
                                    desc=f"epoch {trainer.epoch + 1}/{trainer.total_epochs} "
                                         f"{trainer.stage.name}", unit="it",
                                    dynamic_ncols=True, leave=False)

    def after_iteration(self, trainer, log):
        self.count += 1
        self.images += trainer.batch_images
        for k, v in log.items():
            self.sums[k] += v
        if self.bar is not None:
            rate = self.images / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(postfix(log, rate), refresh=False)
            self.bar.update(1)

    def end_epoch(self, trainer):
        self.close(trainer)
        if not self.count:
            return
        seconds = time.perf_counter() - self.start
        means = {k: v / self.count for k, v in self.sums.items()}
        trainer.last_epoch_losses = means
        phase = trainer.phase
        attention = ("learning" if phase.train_attention else
                     "A_S frozen, A_T refining" if phase.refine_target_attention else "frozen")
        logger.info("epoch %d/%d %s: %s | %.0f img/s | lr %.2e | %s",
                    trainer.epoch, trainer.total_epochs, trainer.stage.name,
                    postfix(means, None), self.images / max(seconds, 1e-9), self.lr,
                    "re-ID only" if not trainer.stage.translates else
                    f"attention {attention}, "
                    f"D on {'backgrounds' if phase.masked_discriminator else 'whole images'}")

    def close(self, trainer):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@torch.no_grad()
def write_image_grid(trainer: Trainer) -> None:
    """Source | attention mask | translation S -> T | cycle reconstruction, as a PNG
    (``<output-dir>/images/epoch<N>.png``; rank 0, stages that translate)."""
    if not trainer.dist.is_main or not trainer.stage.translates:
        return
    try:
        from edaan_fast.viz import plot_translation_grid
    except ImportError as exc:
        logger.warning("no image grid (edaan_fast.viz needs matplotlib: %s)", exc)
        return
    if trainer.probe is None:
        dl = build_loader(trainer.source.train[:8], train=False, batch_size=8, num_workers=0,
                          image_size=tuple(trainer.run.image_size))
        trainer.probe = next(iter(dl)).images
    model, cfg = trainer.model, trainer.model_config
    unit = lambda x: to_unit_range(x, cfg.pixel_mean, cfg.pixel_std)  # noqa: E731
    was_training = model.training
    model.eval()
    x = trainer.probe.to(trainer.device)
    s2t = model.s2t(x)
    rec = model.t2s(s2t.image).image if cfg.cycle_through_attention else \
        model.generator_T(model.encoder_T(s2t.generated))
    columns = {"source": unit(x)}
    if s2t.attention is not None:
        columns["attention"] = s2t.attention.float().clamp(0, 1).expand(-1, 3, -1, -1)
    columns["translation"] = unit(s2t.image)
    columns["cycle"] = unit(rec)
    model.train(was_training)
    path = trainer.output_dir / "images" / f"epoch{trainer.epoch:04d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_translation_grid({k: v.cpu() for k, v in columns.items()}, path,
                          value_range=(0.0, 1.0))


def record_attention(trainer: Trainer) -> None:
    """Measure the attention, log it, and keep it as the run's latest (``report.json``)."""
    quality = trainer.measure_attention()
    if quality is None:
        return
    trainer.attention = quality
    for net in ("A_S", "A_T"):
        for k, v in quality[net].items():
            if k != "images":
                trainer.scalar(f"attention/{net}/{k}", v, trainer.epoch)
    logger.info("epoch %d attention: A_S %s | A_T %s", trainer.epoch,
                AttentionQuality(**quality["A_S"]).summary(),
                AttentionQuality(**quality["A_T"]).summary())


def record_evaluation(trainer: Trainer, metrics: dict[str, float | None]) -> None:
    """Keep target metrics in the run's history, log them and write their scalars."""
    trainer.history.append({"epoch": trainer.epoch, "metrics": metrics})
    for k, v in metrics.items():
        trainer.scalar(f"target/{k}", v, trainer.epoch)
    logger.info("epoch %d target: R1 %.1f  R5 %.1f  R10 %.1f  mAP %.1f  mINP %s",
                trainer.epoch, 100 * metrics["rank1"], 100 * metrics["rank5"],
                100 * metrics["rank10"], 100 * metrics["mAP"],
                "-" if metrics["mINP"] is None else f"{100 * metrics['mINP']:.1f}")


class ImageGrid(HookBase):
    """The translation grid every ``eval_every`` epochs."""

    def after_epoch(self, trainer):
        if _due(trainer, trainer.run.eval_every):
            write_image_grid(trainer)


class AttentionMeasurement(HookBase):
    """Attention quality of ``A_S`` / ``A_T`` every ``eval_every`` epochs."""

    def after_epoch(self, trainer):
        if _due(trainer, trainer.run.eval_every):
            record_attention(trainer)


class TargetEvaluation(HookBase):
    """Target metrics every ``eval_every`` epochs (stages that train re-ID)."""

    def after_epoch(self, trainer):
        if _due(trainer, trainer.run.eval_every) and trainer.stage.labelled:
            record_evaluation(trainer, trainer.evaluate())


class Checkpointing(HookBase):
    """``checkpoint.pt`` every ``checkpoint_every`` epochs."""

    def after_epoch(self, trainer):
        if _due(trainer, trainer.run.checkpoint_every):
            trainer.save()


class StopRequest(HookBase):
    """SIGINT, SIGTERM or SIGUSR1 (:data:`~.signals.STOP_SIGNALS`) -> "stop after this
    iteration"; a second one raises at once, and so does the first while ``immediate`` (no
    training state is changing: the final evaluation). ``signum``: the first signal received.

    Loader worker processes forked from the trainer inherit the handler; a terminal's Ctrl-C
    (or a scheduler's signal to the whole job) reaches them too, and they ignore it (the
    trainer process decides, and says so once).
    """

    def __init__(self):
        self.requested = False
        self.immediate = False
        self.signum = signal.SIGINT
        self._previous: dict[int, Any] = {}
        self._installed = False
        self._pid = os.getpid()
        self._poll: StopPoll | None = None

    def before_train(self, trainer):
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            self._previous = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
            self._installed = True

    def after_iteration(self, trainer, log):
        if self._poll is None:
            self._poll = StopPoll(trainer.dist)
        if self._poll(self.requested):  # under DDP: the ranks' flags of the last iteration
            raise KeyboardInterrupt

    def any_rank(self, trainer: Trainer) -> bool:
        """Whether any rank was asked to stop (a blocking all-reduce under DDP)."""
        if self._poll is not None:
            self._poll.drain()  # the flag in flight: its group must not hold an open op
        return any_rank(trainer.dist, self.requested, trainer.device)

    def close(self, trainer):
        if self._poll is not None:
            self._poll.drain()
        if self._installed:
            for s, previous in self._previous.items():
                signal.signal(s, previous)
            self._installed = False

    def _handler(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a loader worker
        if self.requested or self.immediate:
            if not self.requested:
                self.signum = signum
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        again = "Ctrl-C" if signum == signal.SIGINT else signal_name(signum)
        logger.warning("%s: finishing this iteration, then saving a checkpoint "
                       "(%s again to stop at once, without saving)",
                       "interrupt" if signum == signal.SIGINT else signal_name(signum), again)


def default_hooks() -> list[HookBase]:
    """The built-in hooks, in the order they run (before the caller's)."""
    return [PhaseSwitch(), LRSchedule(), TensorBoard(), Progress(), ImageGrid(),
            AttentionMeasurement(), TargetEvaluation(), Checkpointing()]
