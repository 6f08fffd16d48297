"""edaan_fast.engine: the training step (generator + discriminator updates, AMP, image pools)."""

from .image_pool import ImagePool
from .step import EDAANTrainStep, NonFiniteLossError, Phase, resolve_amp_dtype

__all__ = ["EDAANTrainStep", "ImagePool", "NonFiniteLossError", "Phase", "resolve_amp_dtype"]
