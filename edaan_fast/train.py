"""``python -m edaan_fast.train``: train EDAAN source -> target and report target metrics.

With no data arguments it trains on the embedded synthetic two-domain set (source domain ->
target domain) with the ``tiny`` preset, which a 2-core CPU finishes in minutes::

    python -m edaan_fast.train --amp
    python -m edaan_fast.train --source market1501 --target dukemtmcreid --data-root /data \\
        --preset paper --amp --output-dir runs/m2d
    torchrun --nproc-per-node 4 -m edaan_fast.train --preset paper ...   # DDP

Options resolve in three layers: the defaults, then ``--config file.yaml`` (keys are the
option names, ``-`` or ``_``), then the options given on the command line. The resolved
configuration is written to ``<output-dir>/config.yaml`` and into every checkpoint.

A fresh run refuses an ``--output-dir`` that already holds a run (``checkpoint.pt``,
``final.pt``): ``--resume`` it, or pass ``--overwrite`` to start over there. A run holds the
folder's lock (``.<dir>.lock`` beside it) for its life: a second run into the same folder exits
2 naming the first. Every image is checked before the first iteration (``--bad-images``).

Exit status: 0 done; 1 a loss became NaN/inf; 2 a configuration, data or checkpoint error, a
folder in use by another run, a checkpoint that cannot be written (disk full), or a data
file that failed mid-run (a checkpoint was saved first), as one line on stderr; 3 a data
loader worker died or the DALI pipeline failed (a checkpoint was saved: ``--resume`` it);
130 / 143 / 138 stopped by Ctrl-C / SIGTERM / SIGUSR1 (a checkpoint was saved: ``--resume``
it with the same command; docs/training.md, "Long runs").
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["build_parser", "main"]

EPILOG = """\
schedule (paper section IV-B): Adam lr 2e-4, betas (0.5, 0.999); lr constant for the first half
of the epochs, then linear decay to 0. Attention nets learn and discriminators see whole images
until the phase epoch (paper preset: max(1, round(30/200 * epochs)), the paper's 30 of 200;
tiny preset: round(0.3 * epochs), 12 of 40), then A_S is frozen, A_T learns only from A_S's
maps on the translations (--attention-refine) and the discriminators see backgrounds only.
Attention training departs from the printed setting in four places (docs/attention.md);
--paper-attention restores it.

variants: edaan = translator and re-ID trained jointly; daan = translator first, translated
source set written to <output-dir>/translated/, then re-ID on real + translated; cyclegan =
attention-free translator, then re-ID on the translations only; direct = re-ID on the source
only. daan and cyclegan train epochs + epochs (translator, then re-ID).

outputs in --output-dir: config.yaml, checkpoint.pt (every --checkpoint-every epochs and at the
end), final.pt (the end state, same content), tensorboard/, images/epochNNNN.png, report.json,
report.md; two-stage variants also translator.pt and translated/.
"""


def _default(text: str, value) -> str:
    return f"{text} (default: {value})"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; options left out are absent from the parsed namespace (so a
    ``--config`` file's values are overridden only by options actually given)."""
    from edaan_fast.engine import run_config as c

    d = c.RunConfig()
    p = argparse.ArgumentParser(
        prog="python -m edaan_fast.train", argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train EDAAN (end-to-end domain adaptive attention network) on a labelled "
                    "source and an unlabelled target re-ID data set; report rank-1/5/10, mAP "
                    "and mINP on the target.", epilog=EPILOG)
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file of options (keys = option names); options given on the "
                        "command line override it")
    for add in (_data_options, _model_options, _schedule_options, _objective_options,
                _attention_options, _execution_options, _output_options):
        add(p, d, c)
    return p


def _data_options(p: argparse.ArgumentParser, d, c) -> None:
    """The data options (``d``: the defaults; ``c``: the run configuration module)."""
    g = p.add_argument_group("data")
    g.add_argument("--source", choices=c.DATASET_CHOICES,
                   help=_default("labelled source data set", "synthetic, the embedded set's "
                                 "source domain"))
    g.add_argument("--target", choices=c.DATASET_CHOICES,
                   help=_default("unlabelled target data set, evaluated on its query/gallery",
                                 "synthetic, the embedded set's target domain"))
    g.add_argument("--data-root", metavar="DIR",
                   help=_default("folder holding the data sets (synthetic: its render cache)",
                                 "$EDAAN_FAST_DATA or ~/.cache/edaan_fast for synthetic"))
    g.add_argument("--source-root", metavar="DIR", help="folder of the source data set "
                   "(overrides --data-root for it)")
    g.add_argument("--target-root", metavar="DIR", help="folder of the target data set "
                   "(overrides --data-root for it)")
    g.add_argument("--source-person-masks", metavar="DIR", help="person masks of the source "
                   "data set (python -m edaan_fast.masks): the run's evaluations score A_S "
                   "against them (ROC-AUC, IoU, position AUC) on real images")
    g.add_argument("--target-person-masks", metavar="DIR", help="person masks of the target "
                   "data set: the run's evaluations score A_T against them")
    g.add_argument("--seed", type=int, help=_default(
        "seed of the weights, the samplers, the augmentation and the synthetic set", d.seed))
    g.add_argument("--loader", choices=c.LOADERS,
                   help=_default("image loader: torch DataLoader or NVIDIA DALI", d.loader))
    g.add_argument("--num-workers", type=int, metavar="N", help=_default(
        "loader worker processes / DALI threads", "0 on CPU (bit-for-bit resume), 4 on CUDA"))
    g.add_argument("--bad-images", choices=c.BAD_IMAGES, help=_default(
        "image files that fail the check before training (header, size, a whole file): "
        "error = stop naming them all; skip = train without them (each logged once, counted "
        "in report.json)", d.bad_images))


def _model_options(p: argparse.ArgumentParser, d, c) -> None:
    """The model options (``d``: the defaults; ``c``: the run configuration module)."""
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=tuple(c.RUN_PRESETS), help=_default(
        "network widths, input size and schedule: tiny = 64x32, CPU-sized; small = tiny's "
        "networks with a schedule for real data sets on a CPU (docs/training.md); paper = "
        "256x128, CycleGAN's ResNet-9 / PatchGAN widths", d.preset))
    g.add_argument("--variant", choices=tuple(c.VARIANTS), help=_default(
        "what to train (see 'variants' below)", d.variant))
    g.add_argument("--attention", action=argparse.BooleanOptionalAction,
                   help="with / without the attention nets (--no-attention: the paper's 'w/o "
                        "attention' rows; edaan and daan only) (default: with)")
    g.add_argument("--metric-loss", choices=c.METRIC_LOSSES,
                   help=_default("metric loss of the re-ID module: eq. (7) or eq. (6)",
                                 d.metric_loss))
    g.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help=_default("input size",
                                 "the preset's: tiny and small 64 32, paper 256 128"))


def _schedule_options(p: argparse.ArgumentParser, d, c) -> None:
    """The schedule options (``d``: the defaults; ``c``: the run configuration module)."""
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, metavar="N", help=_default(
        "training epochs (per stage for daan/cyclegan)",
        ", ".join(f"{k} {v.epochs}" for k, v in c.RUN_PRESETS.items())))
    g.add_argument("--iters-per-epoch", type=int, metavar="N", help=_default(
        "iterations per epoch", "one pass of the PK sampler over the source set" + "".join(
            f"; {k}: at most {v.iters_per_epoch}" for k, v in c.RUN_PRESETS.items()
            if v.iters_per_epoch)))
    g.add_argument("--batch-size", type=int, metavar="N", help=_default(
        "global batch: P identities x K images (split over DDP processes)", d.batch_size))
    g.add_argument("--num-instances", type=int, metavar="K",
                   help=_default("images per identity in a batch", d.num_instances))
    g.add_argument("--lr", type=float, help=_default("Adam learning rate", d.lr))
    g.add_argument("--beta1", type=float, help=_default("Adam beta1", d.beta1))
    g.add_argument("--beta2", type=float, help=_default("Adam beta2", d.beta2))
    g.add_argument("--phase-epoch", type=int, metavar="N", help=_default(
        "epoch at which the attention nets freeze and the discriminators switch to "
        "backgrounds",
        "paper: max(1, round(30/200 * epochs)); tiny and small: round(0.3 * epochs)"))


def _objective_options(p: argparse.ArgumentParser, d, c) -> None:
    """The objective options (``d``: the defaults; ``c``: the run configuration module)."""
    g = p.add_argument_group("objective (eq. 9)")
    g.add_argument("--lambda-cyc", type=float, help=_default(
        "weight of the cycle loss", ", ".join(f"{k} {v.lambda_cyc:g}"
                                             for k, v in c.RUN_PRESETS.items())))
    g.add_argument("--lambda-attn", type=float,
                   help=_default("weight of the attention loss (eq. 5)", d.lambda_attn))
    g.add_argument("--lambda-metric", type=float,
                   help=_default("weight of the quartet/triplet loss", d.lambda_metric))
    g.add_argument("--lambda-id", type=float,
                   help=_default("weight of the identity loss (eq. 8)", d.lambda_id))
    g.add_argument("--lambda-gan", type=float,
                   help=_default("weight of both adversarial losses", d.lambda_gan))
    g.add_argument("--margin", type=float, help=_default("metric loss margin", d.margin))
    g.add_argument("--label-smoothing", type=float,
                   help=_default("label smoothing of the identity loss", d.label_smoothing))
    g.add_argument("--pool-size", type=int,
                   help=_default("image pool of the discriminators (0 = off)", d.pool_size))


def _attention_options(p: argparse.ArgumentParser, d, c) -> None:
    """The attention options (``d``: the defaults; ``c``: the run configuration module)."""
    g = p.add_argument_group("attention (paper §III-A; docs/attention.md)")
    g.add_argument("--attention-lr-scale", type=float, metavar="X", help=_default(
        "learning rate of the attention nets, as a multiple of --lr", d.attention_lr_scale))
    g.add_argument("--attention-consistency", choices=c.ATTENTION_CONSISTENCY, help=_default(
        "eq. (5): both maps learn (symmetric, as printed), or the real images' or the "
        "translations' maps are fixed targets",
        d.attention_consistency))
    g.add_argument("--lambda-tv", type=float, help=_default(
        "weight of the attention maps' total variation (a mask regulariser; 0 = off)",
        d.lambda_tv))
    g.add_argument("--lambda-area", type=float, help=_default(
        "weight of the kept area of the attention maps beyond --area-budget (the L1 mask "
        "penalty of GANimation / Chen et al.'s Attention-GAN; 0 = off)", d.lambda_area))
    g.add_argument("--area-budget", type=float, metavar="F", help=_default(
        "fraction of each image the maps may keep at no cost (0 = a plain L1 penalty)",
        d.area_budget))
    g.add_argument("--mask-guidance", type=float, metavar="W", help=_default(
        "weight of the attention maps' cross-entropy against person masks of un-augmented "
        "training crops of both domains, while the maps learn (MGCAM / PTGAN-style guidance; "
        "needs --source-person-masks and --target-person-masks of the training splits; not "
        "in the paper; 0 = off)", d.mask_guidance))
    g.add_argument("--attention-anneal", type=float, metavar="F", help=_default(
        "decay the attention nets' learning rate linearly to 0 over the last fraction F of "
        "the epochs before the phase switch (0 = off)", d.attention_anneal))
    g.add_argument("--binary-mask", type=float, metavar="TAU", help=_default(
        "after the phase switch the discriminators see the background 1 - A > TAU unscaled "
        "(Mejjati et al.'s binarised mask, 0.1); 0 = the soft (1 - A) * x of the paper",
        d.binary_mask))
    g.add_argument("--attention-refine", action=argparse.BooleanOptionalAction,
                   help=_default("after the phase switch A_T keeps learning A_T(x_ST) -> A_S(x_S) "
                                 "alone (not in the paper)", "on, unless the model shares one "
                                 "attention net between the domains"))
    g.add_argument("--reid-attention-grad", action=argparse.BooleanOptionalAction,
                   help=_default("let the re-ID loss on x_ST train the attention nets",
                                 d.reid_attention_grad))
    g.add_argument("--paper-attention", action="store_true",
                   help="the paper's attention training as printed ("
                        + ", ".join(f"{k}={v}" for k, v in c.PAPER_ATTENTION.items())
                        + "); options given explicitly still apply")


def _execution_options(p: argparse.ArgumentParser, d, c) -> None:
    """The execution options (``d``: the defaults; ``c``: the run configuration module)."""
    g = p.add_argument_group("execution")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, help=(
        "mixed precision (torch.autocast): bfloat16 on CUDA (float16 + GradScaler on GPUs "
        "without it) and on CPUs with native bfloat16; float32 with a warning on other CPUs "
        "(default: off)"))
    g.add_argument("--amp-dtype", choices=c.AMP_DTYPES, help=_default(
        "autocast dtype; bfloat16/float16 force it", d.amp_dtype))
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile every sub-network (default: off)")
    g.add_argument("--device", help=_default("torch device", "cuda if available, else cpu"))


def _output_options(p: argparse.ArgumentParser, d, c) -> None:
    """The output options (``d``: the defaults; ``c``: the run configuration module)."""
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", metavar="DIR",
                   help=_default("where the run writes its files", d.output_dir))
    g.add_argument("--checkpoint-every", type=int, metavar="N", help=_default(
        "write checkpoint.pt every N epochs (0: only at the end)", d.checkpoint_every))
    g.add_argument("--eval-every", type=int, metavar="N", help=_default(
        "evaluate on the target and save an image grid every N epochs (0: only at the end)",
        d.eval_every))
    g.add_argument("--eval-batch-size", type=int, metavar="N",
                   help=_default("batch size of feature extraction", d.eval_batch_size))
    g.add_argument("--resume", metavar="PATH", help="continue the run of this checkpoint.pt "
                   "exactly where it stopped (same options; output options may change)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an --output-dir that holds one, deleting its "
                        "checkpoints and report (default: refuse)")
    g.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue even though the data differ from the "
                        "checkpoint's (files added, removed or relabelled; default: refuse, "
                        "saying what changed)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="show progress bars when stderr is a terminal; a log gets one "
                        "line per epoch either way (default: on)")


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _fail(error: BaseException, status: int, whole: bool = False) -> int:
    from edaan_fast._cli import one_line

    text = str(error).rstrip() if whole else one_line(error)
    sys.stderr.write(f"edaan_fast.train: error: {text}\n")
    return status


def _passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning, unless ``OMP_WAIT_POLICY`` is set.

    GNU OpenMP's default spin-wait makes each of PyTorch's threads burn its core at every
    barrier while it waits for the others. On a small CPU machine shared with another process
    that is ruinous: a thread that lost its core holds the team up while the spinning ones take
    the cores it needs (measured on the 2-core machine with another PyTorch job running: 6.7 s
    per tiny-preset training step spinning, 2.0 s passive; alone, 0.64 s against 0.71 s). It is
    read when libgomp loads, so it must be set before ``import torch``;
    ``OMP_WAIT_POLICY=ACTIVE`` keeps the spinning.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    _passive_openmp()
    args = build_parser().parse_args(argv)
    _setup_logging()

    from tqdm.contrib.logging import logging_redirect_tqdm

    from edaan_fast._allocator import pin_malloc_thresholds
    from edaan_fast.data import DatasetError
    from edaan_fast.data.loaders import LoaderFailure
    from edaan_fast.engine.checkpoint import CheckpointError, ResumePoint
    from edaan_fast.engine.hooks import TrainingInterrupted
    from edaan_fast.engine.run_config import (
        PAPER_ATTENTION,
        RunConfig,
        RunConfigError,
        load_run_file,
        resume_config,
    )
    from edaan_fast.engine.steps import NonFiniteLossError
    from edaan_fast.engine.trainer import train
    from edaan_fast.evaluation.report import markdown_table
    from edaan_fast.engine.run_lock import OutputBusyError
    from edaan_fast.engine.signals import exit_status

    pin_malloc_thresholds()
    options = vars(args)
    resume = options.pop("resume", None)
    overwrite = options.pop("overwrite", False)
    allow_data_change = options.pop("allow_data_change", False)
    config_file = options.pop("config", None)
    paper_attention = options.pop("paper_attention", False)
    try:
        merged = load_run_file(config_file) if config_file else {}
        if paper_attention:
            merged.update(PAPER_ATTENTION)
        merged.update(options)
        if resume is not None:  # read once: the run's options and the states to continue
            resume = ResumePoint.read(resume)
            run = resume_config(resume.checkpoint["run"], merged)
        else:
            run = RunConfig.from_dict(merged, "options").resolve()
        with logging_redirect_tqdm():
            report = train(run, resume=resume, overwrite=overwrite,
                           allow_data_change=allow_data_change)
    except TrainingInterrupted as exc:
        sys.stderr.write(f"edaan_fast.train: {exc}\n")
        return exit_status(exc.signum)
    except KeyboardInterrupt:
        sys.stderr.write("edaan_fast.train: interrupted before training started; nothing "
                         "written\n")
        return 130
    except (CheckpointError, DatasetError, RunConfigError, ValueError, OutputBusyError) as exc:
        return _fail(exc, 2)
    except LoaderFailure as exc:
        return _fail(exc, 3)
    except NonFiniteLossError as exc:
        return _fail(exc, 1, whole=True)
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stdout.write(markdown_table([report], extra_columns=("mINP", "seconds")))
        sys.stdout.write(f"report: {os.path.join(run.output_dir, 'report.json')}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
