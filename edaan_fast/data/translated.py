"""Translated image sets: the one writer of images translated by a trained translator
(:func:`write_translations`, used by ``python -m edaan_fast.translate`` and the two-stage
variants), and the translated source set of those variants (``daan``, ``cyclegan``): the
labelled source images translated S -> T (eq. 1), written once as PNG files that the re-ID
stage then reads like any other records. Owns that folder's layout (``<index:06d>.png`` in the
order of the source records, a ``.complete.json`` marker).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edaan_fast._progress import progress_bar

from .base import Record, install_folder
from .loaders import build_loader
from .transforms import to_unit_range

__all__ = ["IMAGE_FORMATS", "translated_complete", "translated_records", "translation_of",
           "write_translated_set", "write_translations"]

#: File suffix -> Pillow format of the images a translation writes.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
JPEG_QUALITY = 95  # with full-resolution colour (4:4:4): small images, fine detail

Translate = Callable[[torch.Tensor], tuple[torch.Tensor, "torch.Tensor | None"]]


def translation_of(model: nn.Module, direction: str = "s2t") -> Translate:
    """``x -> (translation, attention map or None)`` of ``model`` (an
    :class:`~edaan_fast.models.EDAAN`): eq. (1) for ``"s2t"``, eq. (2) for ``"t2s"``."""
    mapping = {"s2t": model.s2t, "t2s": model.t2s}[direction]

    def translate(x: torch.Tensor):
        out = mapping(x)
        return out.image, out.attention

    return translate


def _save(array: np.ndarray, path: Path) -> None:
    """Write one image atomically (a temporary file renamed), so an interrupted run never
    leaves a truncated file that a resumed run would take as done."""
    from PIL import Image

    fmt = IMAGE_FORMATS[path.suffix.lower()]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    extra = {"quality": JPEG_QUALITY, "subsampling": 0} if fmt == "JPEG" else {}
    Image.fromarray(array).save(tmp, format=fmt, **extra)
    os.replace(tmp, path)


def _pending(destinations: Sequence[Path], masks: Sequence[Path] | None,
             skip_existing: bool) -> list[int]:
    if not skip_existing:
        return list(range(len(destinations)))
    return [i for i, d in enumerate(destinations)
            if not d.is_file() or (masks is not None and not masks[i].is_file())]


@torch.no_grad()
def write_translations(translate: Translate, records: Sequence[Record],
                       destinations: Sequence[Path], *, image_size: tuple[int, int],
                       pixel_mean, pixel_std, masks: Sequence[Path] | None = None,
                       device: torch.device | str = "cpu",
                       amp_dtype: torch.dtype | None = None,
                       batch_size: int = 64, num_workers: int = 0, loader: str = "torch",
                       skip_existing: bool = False, progress: bool = False,
                       desc: str = "translating") -> int:
    """Translate ``records`` (evaluation preprocessing: resize to ``image_size``, normalise)
    with ``translate`` (:func:`translation_of`) and write image ``i`` to ``destinations[i]``
    (PNG or JPEG by its suffix; pixels in [0, 1] via ``pixel_mean``/``pixel_std``), its
    attention map to ``masks[i]`` as an 8-bit PNG if given.

    With ``skip_existing`` a record whose files all exist is not translated again (each file is
    written under a temporary name and renamed, so an existing file is complete). ``amp_dtype``
    (the caller's :func:`~edaan_fast.engine.precision.resolve_precision`; ``None`` = float32)
    runs the translator under autocast. Returns the number of images written.
    """
    device = torch.device(device)
    todo = _pending(destinations, masks, skip_existing)
    if not todo:
        return 0
    dl = build_loader([records[i] for i in todo], loader=loader, train=False,
                      batch_size=batch_size, num_workers=num_workers, image_size=image_size,
                      device=None if loader == "torch" else device)
    batches = progress_bar(dl, enabled=progress, desc=desc, unit="batch", leave=False)
    for batch in batches:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            images, attention = translate(batch.images.to(device))
        pixels = to_unit_range(images, pixel_mean, pixel_std)
        pixels = pixels.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        if masks is not None:
            maps = attention.float().clamp(0, 1).mul(255).round().to(torch.uint8)[:, 0]
            maps = maps.cpu().numpy()
        for k, j in enumerate(batch.index.tolist()):
            _save(pixels[k], destinations[todo[j]])
            if masks is not None:
                _save(maps[k], masks[todo[j]])
    return len(todo)


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
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    was_training = model.training
    model.eval()
    write_translations(translation_of(model, "s2t"), records,
                       [tmp / f"{i:06d}.png" for i in range(len(records))],
                       image_size=image_size, pixel_mean=model.config.pixel_mean,
                       pixel_std=model.config.pixel_std, device=device,
                       batch_size=batch_size, num_workers=num_workers, loader=loader,
                       progress=progress)
    model.train(was_training)
    (tmp / ".complete.json").write_text(json.dumps({"count": len(records)}) + "\n")
    install_folder(tmp, folder)
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
