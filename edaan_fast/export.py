"""``python -m edaan_fast.export``: a checkpoint's re-ID model or translator for deployment,
as ONNX (any ONNX runtime; the fused ops become standard operators) or a ``torch.export``
program (``torch.export.load``, after ``import edaan_fast``).

::

    python -m edaan_fast.export --checkpoint runs/m2d/final.pt --what reid --format onnx reid.onnx
    python -m edaan_fast.export --checkpoint runs/m2d/final.pt --what translator \\
        --direction s2t --format exported-program translator.pt2

Input: ``images`` float32 ``[batch, 3, H, W]`` at the model's size, normalised with the
ImageNet mean and std (the evaluation's preprocessing); the batch size is dynamic. Output:
features ``[batch, embedding_dim]`` (``reid``) or translated images ``[batch, 3, H, W]``,
normalised like the input (``translator``).

Bad inputs (a missing or foreign checkpoint, ``--what translator`` for a run without one, an
existing output without ``--overwrite``, ONNX without the ``export`` extra) are reported as one
line on stderr with exit code 2. This module only parses; :mod:`edaan_fast.deploy.export`
does the work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edaan_fast._cli import run_command, setup_logging

PROG = "python -m edaan_fast.export"
ERRORS = (("edaan_fast.deploy.translation", "TranslationError"),)


def build_parser() -> argparse.ArgumentParser:
    from edaan_fast.deploy.export import EXPORT_FORMATS, EXPORT_WHAT
    from edaan_fast.deploy.translation import DIRECTIONS

    p = argparse.ArgumentParser(prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Export a checkpoint's re-ID model or translator.")
    p.add_argument("output", type=Path, help="file to write (.onnx, .pt2)")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="checkpoint written by edaan_fast.train")
    p.add_argument("--what", choices=EXPORT_WHAT, default="reid",
                   help="reid: images -> features; translator: images -> translated images")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    p.add_argument("--direction", choices=DIRECTIONS, default="s2t",
                   help="translator: s2t = source -> target style (eq. 1), t2s = eq. 2")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0, or 2 for bad inputs)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    from edaan_fast.deploy.export import ExportOptions, run_export

    values = {k: v for k, v in vars(args).items() if k != "quiet"}
    return run_command(PROG, lambda: run_export(ExportOptions(**values)), ERRORS)


if __name__ == "__main__":
    sys.exit(main())
