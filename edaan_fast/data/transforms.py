"""The re-ID augmentations, defined once and implemented twice (torch and DALI).

Train: resize to ``(H, W)`` (bilinear) -> random horizontal flip (p = 0.5) -> zero-pad 10
pixels on every side and random-crop ``(H, W)`` (i.e. a random shift of up to +-10 pixels with
black fill) -> scale to [0, 1] -> normalise with the ImageNet mean/std.
Eval: resize -> scale -> normalise.

:func:`image_tensor` is the one converter of a user's image (a file, a PIL image, a numpy
array) into the uint8 ``[3, h, w]`` tensor these transforms take.

This is the torchreid / fast-reid recipe, and what the EDAAN paper's re-ID module trains on at
256 x 128. :mod:`edaan_fast.data.loaders` builds the DALI twin of the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import v2

from .base import read_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit_range(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Normalised images ``[N, C, H, W]`` back to float32 pixels in [0, 1] (the inverse of the
    last transform step, clamped): what figures and the translated set show."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() * s + m).clamp(0.0, 1.0)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings shared by the torch and DALI pipelines."""

    height: int = 256
    width: int = 128
    train: bool = True
    flip_p: float = 0.5
    pad: int = 10
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, got {(self.height, self.width)}")
        if not 0.0 <= self.flip_p <= 1.0 or self.pad < 0:
            raise ValueError(f"need 0 <= flip_p <= 1 and pad >= 0, got {self.flip_p}, {self.pad}")


def build_transform(cfg: AugmentConfig) -> v2.Compose:
    """torchvision v2 transform: uint8 ``[3, h, w]`` tensor -> float32 ``[3, H, W]``."""
    steps: list = [v2.Resize((cfg.height, cfg.width),
                             interpolation=v2.InterpolationMode.BILINEAR, antialias=True)]
    if cfg.train:
        if cfg.flip_p > 0:
            steps.append(v2.RandomHorizontalFlip(cfg.flip_p))
        if cfg.pad > 0:
            steps += [v2.Pad(cfg.pad, fill=0), v2.RandomCrop((cfg.height, cfg.width))]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
    return v2.Compose(steps)


def decode_file(path: str) -> torch.Tensor:
    """Decode an image file (Pillow, libjpeg-turbo) to uint8 RGB ``[3, h, w]``.

    A missing or corrupt file raises :class:`~edaan_fast.data.DatasetError` naming the path.
    (Pillow rather than ``torchvision.io``, whose decoders are deprecated since 0.29.)
    """
    return torch.from_numpy(np.array(read_image(path))).permute(2, 0, 1)


def image_tensor(image) -> torch.Tensor:
    """One image as uint8 RGB ``[3, h, w]``, the input of :func:`build_transform`: a file path
    (decoded as :func:`decode_file` does), a PIL image (converted to RGB), a numpy array
    ``[h, w, 3]`` or ``[h, w]`` (grey) of uint8, or a uint8 tensor ``[3, h, w]``.

    Raises:
        ValueError: an array or tensor of another dtype or shape, or another kind of object.
        DatasetError: a path that is missing or not a readable image.
    """
    from pathlib import Path

    from PIL import Image

    if isinstance(image, (str, Path)):
        return decode_file(str(image))
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3
                                                               and image.shape[2] == 3)):
            raise ValueError(f"expected a uint8 numpy array [H, W, 3] (RGB) or [H, W] (grey), "
                             f"got {image.dtype} {list(image.shape)}")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 image tensor [3, H, W], got {image.dtype} "
                             f"{list(image.shape)}")
        return image.cpu()
    raise ValueError(f"expected an image path, a PIL image, a uint8 numpy array [H, W, 3] or a "
                     f"uint8 tensor [3, H, W], got {type(image).__name__}")
