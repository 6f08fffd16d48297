"""``python -m edaan_fast.evaluate``: score a checkpoint (or exported features) on a target
protocol, print a table shaped like the paper's Tables I-III, and optionally write the metrics
as JSON, the features as ``.npz`` and the paper's figures (Figs. 4-7) as PNG files.

::

    python -m edaan_fast.evaluate --checkpoint runs/default/ckpt.pt           # the run's target
    python -m edaan_fast.evaluate --checkpoint runs/m2d/ckpt.pt --dataset dukemtmcreid \\
        --data-root /data --flip --rerank --output m2d.json
    python -m edaan_fast.evaluate --checkpoint C --dataset cuhk03 --data-root /data \\
        --cuhk03-protocol classic --cuhk03-repeats 10
    python -m edaan_fast.evaluate --checkpoint C --dataset prid2011 --data-root /data   # both ways
    python -m edaan_fast.evaluate --checkpoint C --export-features feats.npz
    python -m edaan_fast.evaluate --features feats.npz --rerank                   # no model needed
    python -m edaan_fast.evaluate --checkpoint C --figures figs/ --compare-checkpoint noattn.pt

Protocols (``edaan_fast.metrics.features.PROTOCOLS``): ``market`` (Market-1501 / DukeMTMC-reID
single query; also the synthetic set and CUHK03's 767/700 split), ``cuhk03`` (the paper's
1,367/100 split: single-gallery-shot CMC averaged over ``--cuhk03-repeats`` draws) and
``prid2011`` (cam1 -> cam2 and cam2 -> cam1, plus their mean).

Without ``--dataset`` the checkpoint's own target is evaluated the way its run was: for a run
on the embedded synthetic set that is the same target domain (preset and seed of the run), so
re-evaluating a run's final checkpoint reproduces the metrics of its report.

Errors in the inputs (missing, truncated or foreign checkpoints, a checkpoint of another
variant or preset than ``--expect-variant`` / ``--expect-preset``, a data set without a query
split, features whose dimensions disagree, ...) are reported as one line on stderr with exit
code 2.

This module only parses: the flags become :class:`~edaan_fast.evaluation.job.EvaluateOptions`
and :func:`~edaan_fast.evaluation.job.run_evaluation` does the work.
"""


from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edaan_fast.evaluation.report import VARIANT_NAMES
from edaan_fast.evaluation.targets import DATASETS

logger = logging.getLogger("edaan_fast.evaluate")

PROG = "python -m edaan_fast.evaluate"
EXIT_ERROR = 2
#: Bad inputs of an evaluation besides the ones every command has (one line, exit 2).
ERRORS = (("edaan_fast.metrics.features", "EvaluationError"),
          ("edaan_fast.metrics.features", "FeatureMismatchError"))
VARIANTS = tuple(VARIANT_NAMES)


def _check_options(p: argparse.ArgumentParser) -> None:
    chk = p.add_argument_group("checks")
    chk.add_argument("--expect-variant", choices=VARIANTS,
                     help="refuse a checkpoint of another variant")
    chk.add_argument("--expect-preset", choices=("tiny", "small", "paper"),
                     help="refuse a checkpoint of another preset")
    chk.add_argument("--expect-attention", action=argparse.BooleanOptionalAction, default=None,
                     help="refuse a checkpoint with (--expect-no-attention) / without attention")


def _attention_options(p: argparse.ArgumentParser) -> None:
    at = p.add_argument_group("attention (models with attention nets)")
    at.add_argument("--person-masks", type=Path, metavar="DIR",
                    help="person masks of the evaluated data set (python -m edaan_fast.masks): "
                         "score the attention net of its domain against them (ROC-AUC, IoU, "
                         "position AUC) and draw them beside the maps in the figures")
    at.add_argument("--attention-domain", choices=("target", "source"), default="target",
                    help="which net the evaluated data set's images belong to: target = A_T, "
                         "source = A_S")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate an EDAAN checkpoint (or exported features) on a re-ID protocol.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("what to evaluate")
    src.add_argument("--checkpoint", type=Path, help="checkpoint written by edaan_fast.train")
    src.add_argument("--features", type=Path,
                     help="evaluate features exported with --export-features (no model)")
    src.add_argument("--dataset", choices=DATASETS,
                     help="target data set (default: the checkpoint's target)")
    src.add_argument("--data-root", type=Path,
                     help="data set folder (default: where the run read its target); for "
                          "synthetic, the cache root")
    src.add_argument("--protocol", choices=("market", "cuhk03", "prid2011"),
                     help="with --features: protocol (default: the one stored in the file)")

    fx = p.add_argument_group("feature extraction")
    fx.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                    help="autocast: bfloat16 on GPUs of compute capability >= 8.0 and on CPUs "
                         "with native bfloat16, float16 on older GPUs, float32 on other CPUs; "
                         "off = float32, as the trainer evaluates")
    fx.add_argument("--loader", choices=("torch", "dali"),
                    help="image loader (default: the run's, torch when DALI is missing)")
    fx.add_argument("--flip", action="store_true",
                    help="average the features of each image and its mirror")
    fx.add_argument("--batch-size", type=int, default=128)
    fx.add_argument("--num-workers", type=int, default=2, help="loader workers / DALI threads")
    fx.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    fx.add_argument("--metric", choices=("euclidean", "cosine"), default="euclidean",
                    help="feature distance (euclidean = squared euclidean)")
    fx.add_argument("--max-rank", type=int, default=50, help="CMC length")

    pr = p.add_argument_group("protocols")
    pr.add_argument("--cuhk03-protocol", choices=("classic", "new"),
                    help="classic = the paper's 1,367/100 split, single-gallery-shot CMC; new = "
                         "767/700, single query (default: classic)")
    pr.add_argument("--cuhk03-split-id", type=int, help="classic split (0..19; default 0)")
    pr.add_argument("--cuhk03-image-type", choices=("detected", "labeled"),
                    help="CUHK03 boxes (default: detected)")
    pr.add_argument("--cuhk03-repeats", type=int, default=10,
                    help="single-gallery-shot draws averaged")
    pr.add_argument("--seed", type=int, default=0, help="seed of the CUHK03 gallery draws")
    pr.add_argument("--prid-split-seed", type=int,
                    help="seed of PRID2011's 100/100 identity split (default: the run's, else 0)")
    pr.add_argument("--synthetic-preset", choices=("tiny", "small", "paper"),
                    help="synthetic set size (default: tiny for a tiny run, else paper)")
    pr.add_argument("--synthetic-seed", type=int, help="synthetic set seed (default: the run's)")

    rr = p.add_argument_group("k-reciprocal re-ranking (Zhong et al., CVPR 2017)")
    rr.add_argument("--rerank", action="store_true", help="re-rank the distances before ranking")
    rr.add_argument("--k1", type=int, default=20)
    rr.add_argument("--k2", type=int, default=6)
    rr.add_argument("--lambda-value", type=float, default=0.3)

    out = p.add_argument_group("outputs")
    out.add_argument("--output", type=Path, help="write the metrics as JSON")
    out.add_argument("--export-features", type=Path, metavar="NPZ",
                     help="write query/gallery features, pids, camids and paths")
    out.add_argument("--figures", type=Path, metavar="DIR",
                     help="write the paper's figures (rank lists, t-SNE, masks, translations)")
    out.add_argument("--compare-checkpoint", type=Path,
                     help="second model for the figures (e.g. the no-attention run)")
    out.add_argument("--figure-queries", type=int, default=5, help="queries in the rank lists")
    out.add_argument("--figure-images", type=int, default=6,
                     help="images in the mask and translation figures")
    out.add_argument("--name", help="row label of the table (default: from the run)")

    _attention_options(p)
    _check_options(p)

    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and the table only")
    return p


def options_from_args(args: argparse.Namespace):
    """The typed options of parsed flags."""
    from edaan_fast.evaluation.job import EvaluateOptions

    values = {k: v for k, v in vars(args).items() if k not in ("no_progress", "quiet")}
    progress = not (args.no_progress or args.quiet)  # drawn on a terminal only (_progress)
    return EvaluateOptions(**values, progress=progress)


def plan_from_dataset(args: argparse.Namespace, run: dict):
    """The evaluation plan of parsed flags for a run (see
    :func:`~edaan_fast.evaluation.targets.plan_target`)."""
    from edaan_fast.evaluation.targets import plan_target

    return plan_target(options_from_args(args).target, run)


def run(args: argparse.Namespace) -> dict:
    """Everything :func:`main` does, returning the report (the ``--output`` JSON content)."""
    from edaan_fast.engine.run_lock import hold_outputs
    from edaan_fast.evaluation.job import run_evaluation

    with hold_outputs(("--output", args.output), ("--export-features", args.export_features),
                      ("--figures", args.figures)):  # one process per output at a time
        return run_evaluation(options_from_args(args))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0, or 2 for bad inputs)."""
    args = build_parser().parse_args(argv)
    from edaan_fast._allocator import pin_malloc_thresholds
    from edaan_fast._cli import run_command, setup_logging

    setup_logging(args.quiet)
    pin_malloc_thresholds()  # large feature batches: no page faults on every allocation
    return run_command(PROG, lambda: run(args), ERRORS)


if __name__ == "__main__":
    sys.exit(main())
