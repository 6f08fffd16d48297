"""The Market-1501 folder layout reader: owns the split folders, the file-name patterns and
the layout texts that errors show. Market-1501, DukeMTMC-reID and the embedded synthetic set
are all stored in this layout, so their readers share this module.

Both real data sets ship as three folders of JPEGs whose file names carry the labels::

    <root>/bounding_box_train/0002_c1s1_000451_03.jpg   Market-1501: pid_c<cam>s<seq>_<frame>_<box>
    <root>/query/...                                     DukeMTMC-reID: 0001_c2_f0046182.jpg
    <root>/bounding_box_test/...

pid ``-1`` marks junk boxes (dropped everywhere); pid ``0`` marks distractors (kept, so they
compete in the gallery). Camera numbers become 0-based ``camid``. Training pids are relabelled
to ``0..n-1``; query and gallery keep the original pids so that cross-split matching works.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .base import DatasetError, Record, ReIDDataset, find_root, list_images, relabel

logger = logging.getLogger(__name__)

SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

MARKET_LAYOUT = """  <root>/                       (or <root>/Market-1501-v15.09.15/)
    bounding_box_train/0002_c1s1_000451_03.jpg   <pid>_c<cam>s<seq>_<frame>_<box>.jpg
    query/0001_c1s1_001051_00.jpg
    bounding_box_test/0001_c1s1_001051_03.jpg    (pid -1 = junk, dropped; 0 = distractor)"""

DUKE_LAYOUT = """  <root>/                       (or <root>/DukeMTMC-reID/)
    bounding_box_train/0001_c2_f0046182.jpg      <pid>_c<cam>_f<frame>.jpg
    query/0005_c2_f0046985.jpg
    bounding_box_test/0002_c1_f0044158.jpg       (pid -1 = junk, dropped; 0 = distractor)"""

MARKET_PATTERN = re.compile(r"^(-?\d+)_c(\d+)s(\d+)_(\d+)_(\d+)")
DUKE_PATTERN = re.compile(r"^(-?\d+)_c(\d+)_f?(\d+)")


def read_split(folder: Path, pattern: re.Pattern, layout: str,
               first_camera: int = 1) -> list[Record]:
    """The records of one folder of images named ``<pid>..<camera>..``: ``pattern``'s first
    two groups; cameras counted from ``first_camera`` become 0-based camids; pid -1 (junk)
    is dropped."""
    images = list_images(folder)
    if not images:
        raise DatasetError(f"no images (.jpg/.png) in {folder}\nexpected layout:\n{layout}")
    records = []
    for path in images:
        match = pattern.match(path.name)
        if match is None:
            raise DatasetError(
                f"cannot parse identity and camera from file name {path} "
                f"(expected pattern {pattern.pattern!r})\nexpected layout:\n{layout}"
            )
        pid, cam = int(match.group(1)), int(match.group(2))
        if pid == -1:
            continue  # junk box
        if pid < -1 or cam < first_camera:
            raise DatasetError(
                f"bad labels in file name {path}: pid={pid} (expected >= -1), "
                f"camera={cam} (expected >= {first_camera})\nexpected layout:\n{layout}"
            )
        records.append(Record(str(path), pid, cam - first_camera))
    if not records:
        raise DatasetError(f"every image in {folder} is junk (pid -1); nothing to use")
    return records


def read_market_layout(root: str | Path, name: str, candidates: tuple[str, ...],
                       pattern: re.Pattern, layout: str) -> ReIDDataset:
    """Read any data set stored in the Market-1501 folder layout."""
    base = find_root(root, candidates, tuple(SPLIT_DIRS.values()), layout)
    splits = {k: read_split(base / d, pattern, layout) for k, d in SPLIT_DIRS.items()}
    dataset = ReIDDataset(name, base, relabel(splits["train"]), splits["query"],
                          splits["gallery"])
    logger.info("loaded %r", dataset)
    return dataset
