"""A trained model's re-ID features from the user's own code: :class:`FeatureExtractor`, the
counterpart of torchreid's ``FeatureExtractor``.

It applies exactly the evaluation's preprocessing (:mod:`edaan_fast.data.transforms`, eval:
resize to the model's ``(H, W)``, scale, normalise) and feature computation
(:func:`~edaan_fast.evaluation.evaluator.model_features`), so its features are the ones
``python -m edaan_fast.evaluate --export-features`` writes for the same images and options.

>>> from edaan_fast import FeatureExtractor
>>> extract = FeatureExtractor("runs/default/final.pt", device="cpu", normalize=True)
>>> features = extract(["a.jpg", "b.jpg"])            # float32 [2, embedding_dim]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edaan_fast.engine.checkpoint import load_checkpoint, model_from_checkpoint
from edaan_fast.engine.precision import device_of
from edaan_fast.evaluation.evaluator import model_features

__all__ = ["FeatureExtractor"]


def _items(images) -> list:
    """``images`` as a list of single images (a lone image becomes a list of one)."""
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, (Sequence, np.ndarray)):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


class FeatureExtractor:
    """Callable returning the re-ID features (``encoder_S`` + embedding, the test-time path)
    of images, as evaluation computes them.

    Args:
        checkpoint: a checkpoint written by ``edaan_fast.train`` (any variant), or its path.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; default CUDA when present.
        amp: autocast as ``evaluate --amp`` (the dtype of
            :func:`~edaan_fast.engine.precision.resolve_precision`).
        flip: average each image's features with its mirror's, as ``evaluate --flip``.
        normalize: L2-normalise each feature vector.
        batch_size: images per forward pass.

    Calling it with image paths, PIL images, uint8 numpy arrays (``[H, W, 3]``, or a stack
    ``[N, H, W, 3]``), uint8 tensors ``[3, H, W]`` (one list or a single image), or a float
    tensor batch ``[N, 3, H, W]`` that is already preprocessed (the model's size, normalised),
    returns float32 features ``[N, feature_dim]`` on the CPU.

    Raises:
        CheckpointError: the checkpoint is missing, foreign or does not fit the model.
        ValueError: a bad device, or an input that is not an image of a kind listed above.
        DatasetError: an image path that is missing or unreadable.
    """

    def __init__(self, checkpoint: str | os.PathLike | dict, *,
                 device: str | torch.device | None = None, amp: bool = False,
                 flip: bool = False, normalize: bool = False, batch_size: int = 64):
        from edaan_fast.data.transforms import AugmentConfig, build_transform

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = device_of(device)
        if not isinstance(checkpoint, dict):
            checkpoint = load_checkpoint(Path(checkpoint), kind="model")
        self.model = model_from_checkpoint(checkpoint)[0].to(self.device).eval()
        self.image_size = tuple(self.model.config.image_size)
        self.amp, self.flip, self.normalize, self.batch_size = amp, flip, normalize, batch_size
        self._transform = build_transform(AugmentConfig(*self.image_size, train=False))

    @property
    def feature_dim(self) -> int:
        """Length of a feature vector."""
        return int(self.model.config.embedding_dim)

    def preprocess(self, images) -> torch.Tensor:
        """The model input of ``images``: float32 ``[N, 3, H, W]``, normalised (a float tensor
        batch is checked and passed through)."""
        from edaan_fast.data.transforms import image_tensor

        if isinstance(images, torch.Tensor) and images.is_floating_point():
            x = images.unsqueeze(0) if images.dim() == 3 else images
            if x.dim() != 4 or tuple(x.shape[1:]) != (3, *self.image_size):
                raise ValueError(f"a float tensor is taken as preprocessed images [N, 3, "
                                 f"{self.image_size[0]}, {self.image_size[1]}] (the model's "
                                 f"size), got {list(images.shape)}; pass uint8 images to have "
                                 "them resized and normalised")
            return x.float()
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        items = _items(images)
        if not items:
            raise ValueError("no images given")
        return torch.stack([self._transform(image_tensor(im)) for im in items])

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        x = self.preprocess(images)
        out = []
        for start in range(0, x.shape[0], self.batch_size):
            batch = x[start:start + self.batch_size].to(self.device)
            out.append(model_features(self.model, batch, amp=self.amp, flip=self.flip).cpu())
        features = torch.cat(out)
        return F.normalize(features, dim=1) if self.normalize else features

    def __repr__(self) -> str:
        return (f"FeatureExtractor(image_size={self.image_size}, feature_dim={self.feature_dim}, "
                f"device={self.device}, amp={self.amp}, flip={self.flip}, "
                f"normalize={self.normalize})")
