"""PRID2011 single-shot reader (Hirzer et al., SCIA 2011) with the paper's protocol.

Layout::

    <root>/single_shot/cam_a/person_0001.png ... person_0385.png
    <root>/single_shot/cam_b/person_0001.png ... person_0749.png

(``<root>`` may also be the folder that holds ``prid_2011/``.) Persons 1..200 are seen by
both cameras; the others appear in one camera only.

Protocol (as in EDAAN, following its ref. [12]): the 200 shared identities are split at
random (``seed``) into 100 training and 100 test identities. Training = both cameras' images of
the training identities (pids relabelled ``0..99``, camid 0 = cam_a, 1 = cam_b). For
``direction="a2b"`` the query holds cam_a's images of the 100 test identities and the gallery
holds cam_b's images of the same identities plus cam_b's unmatched persons (> 200) as
distractors; ``"b2a"`` swaps the cameras. Query/gallery pids are the original person numbers,
so the distractors never match a query.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from .base import DatasetError, ReIDDataset, Record, find_root, list_images, relabel

logger = logging.getLogger(__name__)

PRID_LAYOUT = """  <root>/single_shot/cam_a/person_0001.png     (or <root>/prid_2011/single_shot/...)
  <root>/single_shot/cam_b/person_0001.png     persons 1..200 appear in both cameras"""

PERSON_PATTERN = re.compile(r"^person_(\d+)\.png$", re.IGNORECASE)
CAMERAS = ("cam_a", "cam_b")


def _read_camera(folder: Path) -> dict[int, str]:
    images = list_images(folder)
    if not images:
        raise DatasetError(f"no images in {folder}\nexpected layout:\n{PRID_LAYOUT}")
    persons = {}
    for path in images:
        match = PERSON_PATTERN.match(path.name)
        if match is None:
            raise DatasetError(f"cannot parse person number from file name {path} "
                               f"(expected person_NNNN.png)\nexpected layout:\n{PRID_LAYOUT}")
        persons[int(match.group(1))] = str(path)
    return persons


def prid2011(root: str | Path, direction: str = "a2b", seed: int = 0,
             num_shared: int = 200, num_test: int = 100) -> ReIDDataset:
    """Read PRID2011 single-shot and build the train/query/gallery split.

    Args:
        root: folder holding ``single_shot/`` (or ``prid_2011/single_shot/``).
        direction: ``"a2b"`` (query cam_a, gallery cam_b) or ``"b2a"``.
        seed: seed of the random choice of the test identities among the shared ones.
        num_shared: identities seen by both cameras (persons ``1..num_shared``).
        num_test: how many of them are test identities; the rest train.
    """
    if direction not in ("a2b", "b2a"):
        raise ValueError(f"prid2011: direction must be 'a2b' or 'b2a', got {direction!r}")
    if not 0 < num_test < num_shared:
        raise ValueError(f"prid2011: need 0 < num_test < num_shared, got {num_test}, {num_shared}")
    base = find_root(root, ("", "prid_2011", "prid2011"),
                     ("single_shot/cam_a", "single_shot/cam_b"), PRID_LAYOUT)
    cams = [_read_camera(base / "single_shot" / c) for c in CAMERAS]
    missing = [(c, p) for c, persons in zip(CAMERAS, cams)
               for p in range(1, num_shared + 1) if p not in persons]
    if missing:
        raise DatasetError(
            f"prid2011: persons 1..{num_shared} must appear in both cameras under "
            f"{base / 'single_shot'}; missing e.g. {missing[:5]}\nexpected layout:\n{PRID_LAYOUT}"
        )
    shared = np.arange(1, num_shared + 1)
    perm = np.random.default_rng(seed).permutation(shared)
    test_ids = sorted(int(p) for p in perm[:num_test])
    train_ids = sorted(int(p) for p in perm[num_test:])

    train = [Record(cams[c][p], p, c) for p in train_ids for c in (0, 1)]
    probe, other = (0, 1) if direction == "a2b" else (1, 0)
    query = [Record(cams[probe][p], p, probe) for p in test_ids]
    gallery = [Record(cams[other][p], p, other) for p in test_ids]
    gallery += [Record(path, p, other) for p, path in sorted(cams[other].items())
                if p > num_shared]
    dataset = ReIDDataset("prid2011", base, relabel(train), query, gallery,
                          info={"direction": direction, "seed": seed})
    logger.info("loaded %r", dataset)
    return dataset
