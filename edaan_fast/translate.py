"""``python -m edaan_fast.translate``: render a whole data set in the other domain's style with
a trained translator (EDAAN, DAAN, CycleGAN; with or without attention), written in the
Market-1501 layout with the source file names, so that our reader, torchreid and fast-reid
read the translated set as is (the way SPGAN's and PTGAN's translated sets are used).

::

    python -m edaan_fast.translate --checkpoint runs/m2d/final.pt --direction s2t \\
        --output-dir translated/market-as-duke                  # the run's source, train split
    python -m edaan_fast.translate --checkpoint runs/m2d/final.pt --dataset market1501 \\
        --data-root /data --splits all --save-masks --amp --output-dir out/

Output: ``<output-dir>/bounding_box_train/`` (and with ``--splits all`` ``query/``,
``bounding_box_test/``), images at the model's input size; ``masks/<split>/`` with
``--save-masks``; ``translation.json`` (what was translated, with which translator). A run
that stops part way is resumed by running the same command again: finished files are skipped.
A folder holding another translation (translator, direction, data set or format) is refused.

Bad inputs are reported as one line on stderr with exit code 2. This module only parses;
:mod:`edaan_fast.deploy.translation` does the work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edaan_fast._cli import run_command, setup_logging

PROG = "python -m edaan_fast.translate"
ERRORS = (("edaan_fast.deploy.translation", "TranslationError"),
          ("edaan_fast.engine.run_config", "RunConfigError"))


def build_parser() -> argparse.ArgumentParser:
    from edaan_fast.data import DATASETS
    from edaan_fast.deploy.translation import DIRECTIONS, SPLIT_CHOICES

    p = argparse.ArgumentParser(prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Translate a data set with a trained translator.")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="checkpoint written by edaan_fast.train (a two-stage run's final.pt "
                        "uses its translator.pt)")
    p.add_argument("--output-dir", type=Path, required=True, help="folder to write")
    p.add_argument("--direction", choices=DIRECTIONS, default="s2t",
                   help="s2t: source -> target style (eq. 1); t2s: target -> source (eq. 2)")
    p.add_argument("--dataset", choices=sorted(DATASETS),
                   help="data set to translate (default: the run's source for s2t, its target "
                        "for t2s)")
    p.add_argument("--data-root", type=Path, help="the data set's folder")
    p.add_argument("--splits", choices=SPLIT_CHOICES, default="train",
                   help="train, or all = train, query and gallery")
    p.add_argument("--image-format", choices=("same", "png", "jpg"), default="same",
                   help="same = the source files' format (JPEG quality 95)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2, help="loader worker processes")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="autocast: bfloat16 on GPUs of compute capability >= 8.0 and on "
                        "CPUs with native bfloat16, float16 on older GPUs, float32 on other "
                        "CPUs")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--save-masks", action="store_true",
                   help="also write the attention masks as PNG under masks/")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0, or 2 for bad inputs)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    from edaan_fast.deploy.translation import TranslateOptions, run_translation
    from edaan_fast.engine.run_lock import hold_outputs

    values = {k: v for k, v in vars(args).items() if k not in ("no_progress", "quiet")}
    progress = not (args.no_progress or args.quiet)  # drawn on a terminal only (_progress)

    def translate():
        with hold_outputs(("--output-dir", args.output_dir)):  # one process per folder
            return run_translation(TranslateOptions(**values, progress=progress))

    return run_command(PROG, translate, ERRORS)


if __name__ == "__main__":
    sys.exit(main())
