"""EDAAN networks (paper §III): attention nets ``A_d``, encoders ``E_d``, generators ``G_d``,
PatchGAN discriminators ``D_d``, the re-ID head on ``E_S``, and :class:`EDAAN` composing them.

>>> from edaan_fast.models import build_model
>>> model = build_model("tiny")                  # or "paper"; overrides: build_model("tiny", num_ids=100)
>>> x_st = model.translate_s2t(x_s)              # eq. (1)
"""

from .attention import AttentionNet
from .blocks import ResidualBlock, init_weights, set_requires_grad
from .config import MODEL_PRESETS, ModelConfig, model_config
from .discriminator import PatchDiscriminator, receptive_field
from .edaan import EDAAN, EDAANOutput, Translation, build_model
from .generator import Encoder, Generator
from .reid_head import ReIDHead, ReIDOutput

__all__ = [
    "EDAAN", "MODEL_PRESETS", "AttentionNet", "EDAANOutput", "Encoder", "Generator",
    "ModelConfig", "PatchDiscriminator", "ReIDHead", "ReIDOutput", "ResidualBlock",
    "Translation", "build_model", "init_weights", "model_config", "receptive_field",
    "set_requires_grad",
]
