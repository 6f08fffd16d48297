"""``python -m edaan_fast.masks``: write a person mask for every crop of a real re-ID data set,
so the attention nets are scored on real images (``train --target-person-masks``,
``evaluate --person-masks``) as they are on the embedded set.

::

    python -m edaan_fast.masks --dataset market1501 --data-root /data/market1501 \\
        --output-dir masks/market1501                  # query + gallery (what the scores use)
    python -m edaan_fast.masks ... --splits all        # the training images too

Needs the ``[masks]`` extra (MediaPipe's person segmenter, weights inside the package; it
lives in a virtual environment of its own: :mod:`edaan_fast.data.segmenter`). The layout of
the output and how it is read: :mod:`edaan_fast.data.person_masks`. Running the command again
finishes an interrupted folder. Bad inputs, and a missing extra, are one line on stderr with
exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edaan_fast._cli import run_command, setup_logging

PROG = "python -m edaan_fast.masks"
SPLITS = {"test": ("query", "gallery"), "all": ("train", "query", "gallery"),
          "train": ("train",), "query": ("query",), "gallery": ("gallery",)}


class MasksError(ValueError):
    """A bad option of the command (or the segmenter's extra is missing)."""


def build_parser() -> argparse.ArgumentParser:
    from edaan_fast.data import DATASETS

    p = argparse.ArgumentParser(prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Write a binary person mask (PNG) for every crop of "
                                            "a re-ID data set with an off-the-shelf segmenter.")
    p.add_argument("--dataset", choices=sorted(set(DATASETS) - {"synthetic"}), required=True,
                   help="the data set's layout")
    p.add_argument("--data-root", type=Path, required=True, help="the data set's folder")
    p.add_argument("--output-dir", type=Path, required=True, help="the mask folder to write")
    p.add_argument("--splits", choices=tuple(SPLITS), default="test",
                   help="test = query + gallery (the held-out images the attention scores "
                        "use); all = train, query and gallery")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return p


def run_masks(dataset: str, data_root: Path, output_dir: Path, splits: str,
              progress: bool) -> dict:
    """Segment the chosen splits of a data set into ``output_dir``; returns the manifest."""
    from edaan_fast.data import build_dataset
    from edaan_fast.data.person_masks import write_person_masks
    from edaan_fast.data.segmenter import PersonSegmenter

    if output_dir.exists() and not output_dir.is_dir():
        raise MasksError(f"--output-dir {output_dir} is a file; expected a folder")
    try:
        segmenter = PersonSegmenter()
    except ImportError as exc:
        raise MasksError(str(exc)) from None
    data = build_dataset(dataset, root=data_root)
    records = [r for split in SPLITS[splits] for r in getattr(data, split)]
    try:
        return write_person_masks(records, output_dir, segmenter, dataset=dataset,
                                  progress=progress)
    finally:
        segmenter.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0, or 2 for bad inputs)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    progress = not (args.no_progress or args.quiet)
    return run_command(PROG, lambda: run_masks(args.dataset, args.data_root, args.output_dir,
                                               args.splits, progress),
                       (("edaan_fast.masks", "MasksError"),))


if __name__ == "__main__":
    sys.exit(main())
