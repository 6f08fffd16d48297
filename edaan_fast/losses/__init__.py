"""EDAAN's objective (eq. 3-9): adversarial, cycle, attention-consistency, metric and ID terms."""

from .adversarial import discriminator_input, lsgan_discriminator_loss, lsgan_generator_loss
from .attention import (
    attention_area_loss, attention_consistency_loss, attention_smoothness_loss,
    mask_guidance_loss,
)
from .cycle import cycle_loss
from .identity import CrossEntropyLabelSmooth, id_loss
from .metric import METRIC_LOSSES, QuartetLoss, TripletLoss, build_metric_loss
from .objective import DiscriminatorLosses, EDAANObjective, GeneratorLosses, LossWeights

__all__ = [
    "CrossEntropyLabelSmooth",
    "DiscriminatorLosses",
    "EDAANObjective",
    "GeneratorLosses",
    "LossWeights",
    "METRIC_LOSSES",
    "QuartetLoss",
    "TripletLoss",
    "attention_consistency_loss",
    "attention_smoothness_loss",
    "attention_area_loss",
    "build_metric_loss",
    "cycle_loss",
    "discriminator_input",
    "id_loss",
    "lsgan_discriminator_loss",
    "lsgan_generator_loss",
    "mask_guidance_loss",
]
