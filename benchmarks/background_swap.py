"""An oracle for the method's premise: source persons on real target backgrounds.

EDAAN's attention keeps the person and translates the background, so the most its translation
can hand the re-ID module is a source person, unchanged, in front of a real target-domain
background. This script builds exactly that, from person masks, as a data set in the
Market-1501 layout: its training split holds every source training crop *and* a copy of each
pasted, by its person mask, onto the background of a random target training crop (whose own
person is filled in from the surrounding background by a mask-weighted Gaussian blur). The
query and gallery splits are the source's, linked. Training Direct Transfer on it
(``--variant direct --source market1501 --source-root OUT``) and comparing with Direct Transfer
on the plain source measures what a perfect background translation is worth on a pair::

    python benchmarks/background_swap.py --output /tmp/cuhk03-swap \\
        --source-root ../shared/data/cuhk03-mini --source-masks masks/cuhk03-mini \\
        --target-root ../shared/data/market1501-mini --target-masks masks/market1501-mini

Both data sets are read in the Market-1501 layout (``--source``/``--target`` pick another
reader). Originals are linked, not copied; the pasted images are JPEGs at the source crops'
size. A plain script (not collected by pytest); ``tests/test_background_swap.py`` covers its
functions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from edaan_fast.data import DatasetError, build_dataset
from edaan_fast.data.base import Record, read_image, read_mask
from edaan_fast.data.person_masks import person_mask_path

SPLITS = ("bounding_box_train", "query", "bounding_box_test")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[C, H, W]`` with zero padding (kernel radius 3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x)
    c = x.shape[0]
    y = F.conv2d(x[None], k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)[0]


def fill_person(image: torch.Tensor, person: torch.Tensor, sigma: float = 8.0,
                grow: float = 2.0) -> torch.Tensor:
    """``image`` ``[3, H, W]`` with its person (``person`` ``[H, W]`` in [0, 1]) replaced by a
    mask-weighted blur of the pixels around it: the background alone."""
    keep = (gaussian_blur(person[None], grow)[0] <= 0.1).to(image.dtype)
    fill = gaussian_blur(image * keep, sigma) / (gaussian_blur(keep[None], sigma) + 1e-6)
    return keep * image + (1 - keep) * fill


def paste(person_image: torch.Tensor, person: torch.Tensor, background: torch.Tensor,
          soften: float = 0.7) -> torch.Tensor:
    """``m * person_image + (1 - m) * background``, ``m`` the person mask with softened edges."""
    m = gaussian_blur(person[None], soften).clamp(0, 1) if soften > 0 else person[None]
    return m * person_image + (1 - m) * background


def _tensor(path: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    img = read_image(path)
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)


def _mask(root: Path, record: Record, size: tuple[int, int]) -> torch.Tensor | None:
    path = person_mask_path(root, record.path)
    if not path.is_file():
        return None
    m = Image.fromarray((read_mask(path) > 0.5).astype(np.uint8) * 255)
    if m.size != (size[1], size[0]):
        m = m.resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)


def _name(record: Record, index: int, copy: int, train: bool, suffix: str = ".jpg") -> str:
    """A Market-1501 file name, cameras from 1; training ids (relabelled from 0) from 1, query
    and gallery ids as the data set has them (``0`` = distractor)."""
    pid = record.pid + 1 if train else record.pid
    return f"{pid:04d}_c{record.camid + 1}s1_{index:06d}_{copy:02d}{suffix}"


def build(source, source_masks: Path, target, target_masks: Path, output: Path,
          seed: int = 0) -> dict:
    """Write the data set; returns counts. ``source``/``target``: :class:`ReIDDataset`."""
    rng = np.random.default_rng(seed)
    backgrounds = [r for r in target.train if person_mask_path(target_masks, r.path).is_file()]
    if not backgrounds:
        raise FileNotFoundError(f"no target training crop has a mask in {target_masks}")
    base = output / "Market-1501-v15.09.15"
    for split in SPLITS:
        (base / split).mkdir(parents=True, exist_ok=True)
    for split, records in (("query", source.query), ("bounding_box_test", source.gallery)):
        for i, r in enumerate(records):
            name = _name(r, i, 0, False, Path(r.path).suffix)
            os.symlink(os.path.abspath(r.path), base / split / name)
    pasted = 0
    for i, r in enumerate(source.train):
        os.symlink(os.path.abspath(r.path),
                   base / "bounding_box_train" / _name(r, i, 0, True, Path(r.path).suffix))
        image = _tensor(r.path)
        size = tuple(image.shape[1:])
        person = _mask(source_masks, r, size)
        if person is None:
            continue
        b = backgrounds[int(rng.integers(len(backgrounds)))]
        background = fill_person(_tensor(b.path, size), _mask(target_masks, b, size))
        out = paste(image, person, background).clamp(0, 255).round().to(torch.uint8)
        Image.fromarray(out.permute(1, 2, 0).numpy()).save(
            base / "bounding_box_train" / _name(r, i, 1, True), quality=95)
        pasted += 1
    return {"train": len(source.train), "pasted": pasted, "query": len(source.query),
            "gallery": len(source.gallery), "backgrounds": len(backgrounds)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, type=Path, help="a new folder for the data set")
    p.add_argument("--source", default="market1501")
    p.add_argument("--source-root", required=True)
    p.add_argument("--source-masks", required=True, type=Path)
    p.add_argument("--target", default="market1501")
    p.add_argument("--target-root", required=True)
    p.add_argument("--target-masks", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0, help="draws each crop's background")
    args = p.parse_args(argv)
    if args.output.exists() and any(args.output.iterdir()):
        print(f"background_swap: --output {args.output} exists and is not empty; "
              "expected a new folder", file=sys.stderr)
        return 2
    try:
        source = build_dataset(args.source, root=args.source_root)
        target = build_dataset(args.target, root=args.target_root)
        counts = build(source, args.source_masks, target, args.target_masks, args.output,
                       args.seed)
    except (DatasetError, FileNotFoundError) as exc:
        print(f"background_swap: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
