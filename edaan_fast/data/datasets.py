"""Readers for the Market-1501 and DukeMTMC-reID folder layouts, and the data set registry.

Both data sets ship as three folders of JPEGs whose file names carry the labels::

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
from collections.abc import Callable
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


def _read_split(folder: Path, pattern: re.Pattern, layout: str) -> list[Record]:
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
        if pid < -1 or cam < 1:
            raise DatasetError(
                f"bad labels in file name {path}: pid={pid} (expected >= -1), "
                f"camera={cam} (expected >= 1)\nexpected layout:\n{layout}"
            )
        records.append(Record(str(path), pid, cam - 1))
    if not records:
        raise DatasetError(f"every image in {folder} is junk (pid -1); nothing to use")
    return records


def read_market_layout(root: str | Path, name: str, candidates: tuple[str, ...],
                       pattern: re.Pattern, layout: str) -> ReIDDataset:
    """Read any data set stored in the Market-1501 folder layout."""
    base = find_root(root, candidates, tuple(SPLIT_DIRS.values()), layout)
    splits = {k: _read_split(base / d, pattern, layout) for k, d in SPLIT_DIRS.items()}
    dataset = ReIDDataset(name, base, relabel(splits["train"]), splits["query"],
                          splits["gallery"])
    logger.info("loaded %r", dataset)
    return dataset


def market1501(root: str | Path) -> ReIDDataset:
    """Market-1501 (Zheng et al., ICCV 2015) from ``root`` or ``root/Market-1501-v15.09.15``."""
    return read_market_layout(root, "market1501",
                              ("", "Market-1501-v15.09.15", "market1501",
                               "market1501/Market-1501-v15.09.15"),
                              MARKET_PATTERN, MARKET_LAYOUT)


def dukemtmcreid(root: str | Path) -> ReIDDataset:
    """DukeMTMC-reID (Zheng et al., ICCV 2017) from ``root`` or ``root/DukeMTMC-reID``."""
    return read_market_layout(root, "dukemtmcreid",
                              ("", "DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID"),
                              DUKE_PATTERN, DUKE_LAYOUT)


def _cuhk03(root, **kwargs):
    from .cuhk03 import cuhk03
    return cuhk03(root, **kwargs)


def _prid2011(root, **kwargs):
    from .prid2011 import prid2011
    return prid2011(root, **kwargs)


def _synthetic(root=None, **kwargs):
    from .synthetic import synthetic
    return synthetic(root, **kwargs)


DATASETS: dict[str, Callable[..., ReIDDataset]] = {
    "market1501": market1501,
    "dukemtmcreid": dukemtmcreid,
    "cuhk03": _cuhk03,
    "prid2011": _prid2011,
    "synthetic": _synthetic,
}


def build_dataset(name: str, root: str | Path | None = None, **kwargs) -> ReIDDataset:
    """Build a registered data set.

    Args:
        name: one of ``DATASETS`` (``market1501``, ``dukemtmcreid``, ``cuhk03``,
            ``prid2011``, ``synthetic``).
        root: the data set's folder (for ``synthetic``: the cache root, default
            ``$EDAAN_FAST_DATA`` or ``~/.cache/edaan_fast``).
        **kwargs: reader options, e.g. ``split_id``/``protocol``/``image_type`` for CUHK03,
            ``direction``/``seed`` for PRID2011, ``domain``/``preset``/``seed`` for synthetic.
    """
    try:
        reader = DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown data set {name!r}; choices: {', '.join(sorted(DATASETS))}"
        ) from None
    if root is None and name != "synthetic":
        raise DatasetError(f"{name}: a root folder is required")
    if root is not None:
        path = existing = Path(root).expanduser()
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            where = "is a file" if existing == path else f"is under {existing}, a file"
            raise DatasetError(f"{name}: the data root {path} {where}; expected a folder")
    return reader(root, **kwargs)
