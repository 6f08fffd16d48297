"""The translation job behind ``python -m edaan_fast.translate``: a trained translator (EDAAN,
DAAN, CycleGAN, with or without attention) renders a whole data set in the other domain's
style and writes it in the Market-1501 layout, with the source file names, so that our reader
(:mod:`edaan_fast.data.market_layout`), torchreid and fast-reid read it as is.

Also owns which translator a checkpoint holds (:func:`load_translator`, used by the export
too): a two-stage run's re-ID checkpoint holds untrained generators, so its ``translator.pt``
is used.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from .run_dir import TRANSLATOR_NAME

logger = logging.getLogger("edaan_fast.translate")

__all__ = ["DIRECTIONS", "TranslateOptions", "TranslationError", "load_translator",
           "run_translation"]

#: ``s2t``: eq. (1), ``G`` (source images in the target style); ``t2s``: eq. (2), ``F``.
DIRECTIONS = ("s2t", "t2s")
SPLIT_CHOICES = ("train", "all")
MANIFEST = "translation.json"


class TranslationError(ValueError):
    """Bad options for a translation or an export: no translator in the checkpoint, an output
    folder holding another translation, no attention maps to save, ..."""


def load_translator(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """The trained translator of a checkpoint: ``(model, checkpoint dict, path read)``.

    A checkpoint of the re-ID stage of a two-stage run (``daan``, ``cyclegan``) holds a freshly
    initialised translator; the run's ``translator.pt`` beside it is read instead.

    Raises:
        CheckpointError: the checkpoint (or that ``translator.pt``) is missing or unreadable.
        TranslationError: the run has no translator (``direct``).
    """
    from .run_config import VARIANTS

    path = Path(path)
    ckpt = load_checkpoint(path, kind="model")
    run = ckpt.get("run") or {}
    flags = VARIANTS.get(run.get("variant"))
    if flags is not None and not flags.translator:
        raise TranslationError(f"checkpoint {path} is a {run['variant']} run, which trains a "
                               "re-ID model only and has no translator")
    if flags is not None and not flags.end_to_end and int(ckpt.get("stage", 0)) >= 1:
        sibling = path.parent / TRANSLATOR_NAME
        if not sibling.is_file():
            raise CheckpointError(
                f"checkpoint {path} is the re-ID stage of a {run['variant']} run, whose "
                f"translator is untrained; its trained translator {sibling} does not exist")
        logger.info("%s is the re-ID stage of a %s run: using its translator %s", path,
                    run["variant"], sibling)
        path = sibling
        ckpt = load_checkpoint(path, kind="model")
    model, ckpt = model_from_checkpoint(ckpt, where=f"checkpoint {path}")
    return model.to(device).eval(), ckpt, path
