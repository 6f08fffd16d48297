"""Mask guidance of the attention nets: person masks of training crops as a training signal.

Not in the paper (``train --mask-guidance W``; 0 = off, the default). On real crops no term of
eq. (9) tells the person from the background, and both attention nets drift to keeping
everything (docs/attention.md, "Real images"). With this option the generator step also asks
``A_S`` and ``A_T`` to reproduce an off-the-shelf segmenter's person masks
(:mod:`edaan_fast.data.person_masks`) on un-augmented training crops of their own domain: the
mask supervision of attention of MGCAM (Song et al., CVPR 2018) and the segmenter-guided
translation of PTGAN (Wei et al., CVPR 2018). No identity label of the target is used.

Which crops a step uses is a function of the run's seed and the step number only, so a resumed
run draws the same ones (nothing to checkpoint). The masks of a domain are read once, resized to
the run's input size, as uint8 (``H * W`` bytes per crop: 0.4 GB for Market-1501's 12,936
training crops at 256x128); the crops are decoded per step (a few per domain).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from edaan_fast.data import DatasetError
from edaan_fast.data.base import Record
from edaan_fast.data.person_masks import read_person_masks
from edaan_fast.data.transforms import AugmentConfig, build_transform, decode_file

logger = logging.getLogger("edaan_fast.engine.trainer")

__all__ = ["GuideBatch", "MaskGuidance"]


@dataclass
class GuideBatch:
    """Un-augmented training crops of both domains and their person masks (``[n, 1, H, W]``
    in ``[0, 1]``) for one step."""

    source: torch.Tensor
    source_masks: torch.Tensor
    target: torch.Tensor
    target_masks: torch.Tensor


class _Domain:
    """The crops of one domain that have a person mask, and those masks."""

    def __init__(self, records: Sequence[Record], folder: str | Path, size: tuple[int, int],
                 which: str):
        try:
            self.records, masks = read_person_masks(records, folder, size=size)
        except DatasetError as exc:
            raise DatasetError(f"--mask-guidance needs the person masks of the {which} "
                               f"training split: {exc}") from None
        if not self.records:
            raise DatasetError(f"--mask-guidance: the person-mask folder {folder} has no mask "
                               f"for any of the {len(records)} {which} training images")
        self.masks = (masks * 255).round_().to(torch.uint8)

    def draw(self, generator: torch.Generator, count: int, transform) -> tuple:
        index = torch.randperm(len(self.records), generator=generator)[:count]
        images = torch.stack([transform(decode_file(self.records[i].path)) for i in index])
        return images, self.masks[index].float() / 255


class MaskGuidance:
    """The guide crops and masks of a run (see the module docstring).

    Args:
        source, target: the training records of the two domains.
        source_masks, target_masks: their person-mask folders (``python -m edaan_fast.masks``).
        image_size: the run's ``(H, W)``.
        per_domain: crops of each domain per step.
        seed: the run's seed.

    Raises:
        DatasetError: a folder that is not a mask folder, or a missing, resized or non-binary
            mask of a training crop (named).
    """

    def __init__(self, source: Sequence[Record], target: Sequence[Record],
                 source_masks: str | Path, target_masks: str | Path,
                 image_size: tuple[int, int], per_domain: int, seed: int):
        size = (int(image_size[0]), int(image_size[1]))
        self.source = _Domain(source, source_masks, size, "source")
        self.target = _Domain(target, target_masks, size, "target")
        self.per_domain = int(per_domain)
        self.seed = int(seed)
        self.transform = build_transform(AugmentConfig(height=size[0], width=size[1],
                                                       train=False))
        for which, domain, total in (("source", self.source, source),
                                     ("target", self.target, target)):
            logger.info("mask guidance: %d of %d %s training crops have a person mask",
                        len(domain.records), len(total), which)

    def batch(self, step: int, device: torch.device) -> GuideBatch:
        """The crops and masks of training step ``step`` (0-based), on ``device``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        x_s, m_s = self.source.draw(generator, self.per_domain, self.transform)
        x_t, m_t = self.target.draw(generator, self.per_domain, self.transform)
        return GuideBatch(*(t.to(device, non_blocking=True) for t in (x_s, m_s, x_t, m_t)))
