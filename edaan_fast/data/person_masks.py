"""Person masks of a real re-ID data set: the folder layout, its reader and its writer.

EDAAN's attention nets are meant to keep the person (eq. (1)); the embedded synthetic set
renders a true person mask beside every image, real data sets have none. A *person-mask folder*
gives a real data set the same: one binary PNG per crop, made by an off-the-shelf person
segmenter (:mod:`edaan_fast.data.segmenter`, the ``[masks]`` extra) with
``python -m edaan_fast.masks``, and read wherever the attention is scored
(``train --target-person-masks``, ``evaluate --person-masks``)::

    MASKS/person_masks.json               what made it, counts, crops without a person
    MASKS/query/0001_c1s1_001051_00.png   8-bit, 0 = background, 255 = person,
    MASKS/bounding_box_test/...           the size of its image (H x W)

A mask lives at ``MASKS/<the image's folder name>/<the image's stem>.png``, so one folder
serves every split of a Market-1501-style layout. A crop in which the segmenter found no
person is listed under ``"no_person"`` in ``person_masks.json`` and has no PNG: the scores
leave it out (and say how many). Any other missing, resized or non-binary mask is an error
naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import DatasetError, Record, read_image, read_mask

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST", "mask_key", "person_mask_path", "read_manifest", "read_person_masks",
           "write_person_masks"]

MANIFEST = "person_masks.json"
FORMAT = 1
WRITE_COMMAND = ("python -m edaan_fast.masks --dataset NAME --data-root DIR --output-dir "
                 "MASKS")


def mask_key(image_path: str | Path) -> str:
    """``"<folder name>/<stem>"`` of an image: its mask's place in a mask folder."""
    p = Path(image_path)
    return f"{p.parent.name}/{p.stem}"


def person_mask_path(root: str | Path, image_path: str | Path) -> Path:
    """Where the person mask of ``image_path`` lives in the mask folder ``root``."""
    return Path(root) / f"{mask_key(image_path)}.png"


def read_manifest(root: str | Path) -> dict:
    """The ``person_masks.json`` of a mask folder; :class:`DatasetError` when ``root`` is not
    one (missing, a file, no or a foreign manifest)."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise DatasetError(f"person-mask folder {root} {what}: expected a folder written by "
                           f"{WRITE_COMMAND}")
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"person-mask folder {root} has no {MANIFEST}: expected a folder "
                           f"written by {WRITE_COMMAND}") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a person-mask manifest of format {FORMAT}")
    return manifest


def read_person_masks(records: Sequence[Record], root: str | Path,
                      size: tuple[int, int] | None = None) -> tuple[list[Record], torch.Tensor]:
    """The person masks of ``records`` from the mask folder ``root``.

    Args:
        records: the images (any split of the data set the folder was written for).
        root: the mask folder.
        size: ``(H, W)`` to resize the masks to (bilinear, so edges become fractional);
            default: the first image's size.

    Returns:
        ``(kept, masks)``: the records that have a mask (those the segmenter found no person in
        are left out) and their masks, float32 ``[len(kept), 1, H, W]`` in ``[0, 1]``.

    Raises:
        DatasetError: the folder is not a mask folder, or a mask is missing, unreadable, of
            another size than its image, or not binary (values other than 0 and 255); the
            message names the first such file.
    """
    root = Path(root)
    no_person = set(read_manifest(root).get("no_person", ()))
    kept, masks = [], []
    for rec in records:
        key = mask_key(rec.path)
        if key in no_person:
            continue
        path = root / f"{key}.png"
        if not path.is_file():
            raise DatasetError(f"missing person mask {path} for image {rec.path} (the folder "
                               f"{root} was written for another data set or split?)")
        mask = read_mask(path)
        with Image.open(rec.path) as img:  # the header only
            want = (img.height, img.width)
        if mask.shape != want:
            raise DatasetError(f"person mask {path} is {mask.shape[0]}x{mask.shape[1]}, its "
                               f"image {rec.path} is {want[0]}x{want[1]}")
        if not np.isin(mask, (0.0, 1.0)).all():
            raise DatasetError(f"person mask {path} is not binary: expected the values 0 and "
                               f"255 only")
        kept.append(rec)
        masks.append(torch.from_numpy(mask)[None, None])
    if not masks:
        return kept, torch.zeros(0, 1, *(size or (1, 1)))
    size = tuple(size or masks[0].shape[-2:])
    out = [m if tuple(m.shape[-2:]) == size else
           torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)
           for m in masks]
    return kept, torch.cat(out)


def _write_png(path: Path, mask: np.ndarray) -> None:
    """An 8-bit PNG written to a temporary beside ``path`` and renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(mask).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_manifest(root: Path, manifest: dict) -> None:
    tmp = root / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / MANIFEST)


def write_person_masks(records: Sequence[Record], root: str | Path, segmenter, *,
                       dataset: str = "", progress: bool = True) -> dict:
    """Segment every image of ``records`` and write its binary person mask into ``root``.

    Resumable: masks already written are kept, and so is the list of crops without a person,
    so running it again finishes an interrupted folder. ``person_masks.json`` is rewritten
    after every 500 images and at the end.

    Args:
        records: the images to segment.
        root: the mask folder (created).
        segmenter: a callable ``uint8 [H, W, 3] -> float [H, W]`` person probability, or None
            where it found no person (:class:`~edaan_fast.data.segmenter.PersonSegmenter`).
        dataset: the data set's name, recorded in the manifest.

    Returns:
        the manifest written.
    """
    from edaan_fast._progress import progress_bar

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        manifest = read_manifest(root)
    except DatasetError:
        manifest = {}
    no_person = set(manifest.get("no_person", ()))
    manifest = {"format": FORMAT, "dataset": dataset or manifest.get("dataset", ""),
                "segmenter": getattr(segmenter, "name", type(segmenter).__name__),
                "threshold": 0.5}
    written = skipped = 0
    for i, rec in enumerate(progress_bar(records, desc="person masks", unit="img",
                                         enabled=progress)):
        key = mask_key(rec.path)
        path = root / f"{key}.png"
        if key in no_person or path.is_file():
            skipped += 1
            continue
        probability = segmenter(np.asarray(read_image(rec.path)))
        if probability is None:
            no_person.add(key)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_png(path, np.where(probability > 0.5, 255, 0).astype(np.uint8))
            written += 1
        if i % 500 == 499:
            _write_manifest(root, {**manifest, "no_person": sorted(no_person)})
    manifest.update(no_person=sorted(no_person),
                    images=sum(1 for _ in root.glob("*/*.png")) + len(no_person))
    _write_manifest(root, manifest)
    logger.info("person masks: %d written, %d already there, %d crops without a person (%s)",
                written, skipped, len(no_person), root)
    return manifest
