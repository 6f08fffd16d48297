"""The PatchGAN discriminator ``D_d`` of EDAAN (paper §III-A, eq. 3).

Paper symbols -> code: ``D_T`` = ``EDAAN.discriminator_T`` judges target-style images (real
``x_T`` against the translations ``x_ST = G(x_S)``); ``D_S`` = ``EDAAN.discriminator_S`` judges
source-style images (real ``x_S`` against ``x_TS = F(x_T)``). Eq. (3) as printed writes
``D_S`` in its second line; the text ("the mapping function is G: S -> T and D_T is the
discriminator") and CycleGAN's eq. (1) make clear that ``D_T`` scores the S -> T translation.

Architecture: CycleGAN's 70x70 PatchGAN (``n_layers=3``): 4x4 convs, stride 2, widths
64 -> 128 -> 256, one stride-1 4x4 conv to 512, a stride-1 4x4 conv to 1 channel; LeakyReLU
0.2; instance norm on every layer but the first and the last. The output is a map of
unbounded scores (no sigmoid), one per 70x70 patch, trained with the least-squares (LSGAN)
objective in :mod:`edaan_fast.losses.adversarial`. A 256x128 input gives a 30x14 map.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import instance_norm

__all__ = ["PatchDiscriminator", "receptive_field"]


class PatchDiscriminator(nn.Module):
    """``D_d``: image ``[N, C, H, W]`` -> patch scores ``[N, 1, H', W']`` (real -> 1, fake -> 0)."""

    def __init__(self, in_channels: int = 3, width: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(width * prev, width * mult, 4, stride=stride, padding=1, bias=False),
                instance_norm(width * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(width * mult, 1, 4, stride=1, padding=1))
        self.body = nn.Sequential(*layers)
        self.n_layers = n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def receptive_field(n_layers: int = 3) -> int:
    """Receptive field (pixels) of one output score of a PatchGAN with ``n_layers`` (3 -> 70)."""
    kernels_strides = [(4, 2)] + [(4, 2 if n < n_layers else 1) for n in range(1, n_layers + 1)]
    kernels_strides.append((4, 1))
    rf = 1
    for k, s in reversed(kernels_strides):
        rf = (rf - 1) * s + k
    return rf
