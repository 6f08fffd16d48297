"""The translated source set of the two-stage variants (``daan``, ``cyclegan``): the labelled
source images translated S -> T by a trained translator (eq. 1), written once as PNG files that
the re-ID stage then reads like any other records. Owns the folder's layout
(``<index:06d>.png`` in the order of the source records, a ``.complete.json`` marker).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .base import Record
from .loaders import build_loader
from .transforms import to_unit_range

__all__ = ["translated_complete", "translated_records", "write_translated_set"]


@torch.no_grad()
def write_translated_set(model: nn.Module, records: Sequence[Record],
                         folder: str | os.PathLike, *, image_size: tuple[int, int],
                         device: torch.device | str = "cpu",
                         batch_size: int = 64, num_workers: int = 0, loader: str = "torch",
                         progress: bool = False) -> list[Record]:
    """Translate ``records`` S -> T with ``model`` (eq. 1) and write them as PNG files.

    The folder is written under a temporary name and renamed when complete, with a
    ``.complete.json`` marker; the returned records point at the PNGs and keep the source
    pids and cameras (``<index>.png`` in the order of ``records``).
    """
    from PIL import Image

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    was_training = model.training
    model.eval()
    dl = build_loader(records, loader=loader, train=False, batch_size=batch_size,
                      num_workers=num_workers, image_size=image_size,
                      device=None if loader == "torch" else device)
    batches = dl
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(dl, desc="translating", unit="batch", leave=False)
    for batch in batches:
        x = batch.images.to(device)
        images = to_unit_range(model.translate_s2t(x), model.config.pixel_mean,
                               model.config.pixel_std)
        pixels = images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for k, index in enumerate(batch.index.tolist()):
            Image.fromarray(pixels[k]).save(tmp / f"{index:06d}.png")
    model.train(was_training)
    (tmp / ".complete.json").write_text(json.dumps({"count": len(records)}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return translated_records(records, folder)


def translated_records(records: Sequence[Record], folder: Path) -> list[Record]:
    """The records of a written translated set: its PNGs, with the source pids and cameras."""
    return [Record(str(folder / f"{i:06d}.png"), r.pid, r.camid) for i, r in enumerate(records)]


def translated_complete(records: Sequence[Record], folder: Path) -> bool:
    """Whether ``folder`` holds the complete translated set of ``records``."""
    try:
        return json.loads((folder / ".complete.json").read_text())["count"] == len(records)
    except (OSError, ValueError, KeyError):
        return False
