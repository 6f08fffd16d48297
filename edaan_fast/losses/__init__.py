"""edaan_fast.losses."""

from .adversarial import discriminator_input, lsgan_discriminator_loss, lsgan_generator_loss
from .attention import attention_consistency_loss
from .cycle import cycle_loss
from .identity import id_loss
from .objective import DiscriminatorLosses, EDAANObjective, GeneratorLosses, LossWeights
