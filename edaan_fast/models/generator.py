"""The encoder ``E_d`` and the generator (decoder) ``G_d`` of EDAAN (paper §III-A, eq. 1-4).

Paper symbols -> code: ``E_S`` = ``EDAAN.encoder_S``, ``G_S`` = ``EDAAN.generator_S``, and
``G_S(E_S(x_S))`` is the source image rendered in the *target* style (eq. (1): ``G_S(E_S(x)) :
S -> T``). Likewise ``G_T(E_T(x_T)) : T -> S`` (eq. (2)). The subscript names the domain of
the *input*, not of the output.

Together, ``G_d(E_d(.))`` is CycleGAN's ResNet generator (Zhu et al. 2017), split at the
bottleneck so that the re-ID module can share ``E_S`` as its backbone (§III-B):

- ``E_d``: reflection pad + 7x7 conv (``gen_width`` = 64), ``gen_downsamplings`` stride-2 3x3
  convs doubling the width (64 -> 128 -> 256), then the first ``encoder_blocks`` residual
  blocks. Output: ``[N, feature_dim, H/4, W/4]``.
- ``G_d``: the remaining residual blocks, transposed 3x3 convs (stride 2, output padding 1)
  halving the width back to 64, reflection pad + 7x7 conv to the image channels, ``tanh``
  (the pad + conv run as the fused ``reflect_pad_conv2d`` on the CPU, same parameters).

Every conv is followed by instance norm (no affine, no running stats) and ReLU, except the
last. Nothing assumes square inputs: the 256x128 person crops of the paper go through with
``[N, 256, 64, 32]`` at the bottleneck. The ``tanh`` output in ``[-1, 1]`` is mapped into the
normalisation of the input images (``pixel_mean`` / ``pixel_std``), so the generator's output
can be blended with (eq. 1) and compared to (eq. 4) the normalised real images directly.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ResidualBlock, conv_norm_relu, forward_sequential, instance_norm

__all__ = ["Encoder", "Generator"]


class Encoder(nn.Module):
    """``E_d``: image ``[N, C, H, W]`` -> bottleneck features ``[N, width*2**d, H/2**d, W/2**d]``."""

    def __init__(self, in_channels: int = 3, width: int = 64, downsamplings: int = 2,
                 res_blocks: int = 5):
        super().__init__()
        layers: list[nn.Module] = [conv_norm_relu(in_channels, width, 7)]
        ch = width
        for _ in range(downsamplings):
            layers.append(nn.Sequential(
                nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1, bias=False),
                instance_norm(ch * 2),
                nn.ReLU(inplace=True),
            ))
            ch *= 2
        layers += [ResidualBlock(ch) for _ in range(res_blocks)]
        self.body = nn.Sequential(*layers)
        self.out_channels = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Generator(nn.Module):
    """``G_d``: bottleneck features -> image ``[N, C, H, W]`` in the inputs' normalisation."""

    def __init__(self, out_channels: int = 3, width: int = 64, downsamplings: int = 2,
                 res_blocks: int = 4, pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5)):
        super().__init__()
        ch = width * 2 ** downsamplings
        layers: list[nn.Module] = [ResidualBlock(ch) for _ in range(res_blocks)]
        for _ in range(downsamplings):
            layers.append(nn.Sequential(
                nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1,
                                   bias=False),
                instance_norm(ch // 2),
                nn.ReLU(inplace=True),
            ))
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_channels, 7), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        # tanh output t in [-1, 1] is the pixel (t + 1) / 2 in [0, 1]; normalised like the input.
        mean = torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("out_scale", 0.5 / std, persistent=False)
        self.register_buffer("out_shift", (0.5 - mean) / std, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t = forward_sequential(self.body, h)  # the 7x7 output conv fused on the CPU
        return t * self.out_scale.to(t.dtype) + self.out_shift.to(t.dtype)
