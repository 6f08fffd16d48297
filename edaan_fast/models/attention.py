"""The attention network ``A_d`` of EDAAN (paper §III-A, eq. 1, 2 and 5).

Paper symbols -> code: ``A_S`` = ``EDAAN.attention_S`` and ``A_T`` = ``EDAAN.attention_T``,
each an :class:`AttentionNet`. ``A_S(x_S)`` is the *foreground* map of eq. (1): a per-pixel
score in ``[0, 1]``, high on the person, whom the translation preserves; ``1 - A_S(x_S)`` is the
background map, where the translated image ``G_S(E_S(x_S))`` is pasted in.

Architecture (the paper's Fig. 3 is not in the text; this follows the attention network of
Mejjati et al., "Unsupervised Attention-guided Image-to-Image Translation", NeurIPS 2018):

====================  ===================================================================
7x7 conv, stride 2    ``attn_widths[0]`` (32) channels, instance norm, ReLU  -> H/2 x W/2
3x3 conv, stride 2    ``attn_widths[1]`` (64) channels, instance norm, ReLU  -> H/4 x W/4
residual block        ``attn_widths[1]`` channels (CycleGAN ResNet block)
upsample x2 + 3x3     nearest-neighbour upsampling (no checkerboard of transposed convs),
                      ``attn_widths[1]`` channels, instance norm, ReLU      -> H/2 x W/2
upsample x2 + 3x3     ``attn_widths[0]`` channels, instance norm, ReLU      -> H x W
7x7 conv              1 channel, with bias (no norm), then sigmoid (reflection pad + conv
                      run as the fused ``reflect_pad_conv2d`` on the CPU)
====================  ===================================================================

Two options widen what a score sees (docs/attention.md §8; both off by default, Mejjati's net
as above): ``downsamplings > 2`` adds 3x3 stride-2 stages at ``attn_widths[1]`` channels (and
as many upsampling stages), and ``coords`` appends two coordinate channels to the input
(CoordConv).

Convention: in Mejjati et al. the mask marks the region that is *translated* (the object);
in EDAAN it marks what is *kept* (the person, eq. (1): ``A * x + (1 - A) * G(E(x))``). The
network is the same; only the meaning of its output differs, which the blend of
:meth:`EDAAN.translate_s2t` fixes. Reflection padding everywhere, as in the generator.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ResidualBlock, conv_norm_relu, forward_sequential

__all__ = ["AttentionNet", "coordinate_channels"]


def coordinate_channels(x: torch.Tensor) -> torch.Tensor:
    """``[N, 2, H, W]``: the row and column of every pixel of ``x``, each in ``[-1, 1]``."""
    n, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w)
    return torch.cat([ys.expand(n, 1, h, w), xs.expand(n, 1, h, w)], dim=1)


class AttentionNet(nn.Module):
    """``A_d``: image ``[N, C, H, W]`` -> foreground mask ``[N, 1, H, W]`` in ``[0, 1]``.

    H and W must be multiples of ``2 ** downsamplings`` (that many stride-2 stages, then as
    many x2 upsamplings).
    """

    def __init__(self, in_channels: int = 3, widths: tuple[int, int] = (32, 64),
                 init_bias: float = 0.0, downsamplings: int = 2, coords: bool = False):
        super().__init__()
        if downsamplings < 2:
            raise ValueError(f"AttentionNet: downsamplings must be >= 2, got {downsamplings}")
        w1, w2 = widths
        self.coords = coords
        down = [conv_norm_relu(in_channels + (2 if coords else 0), w1, 7, stride=2),
                conv_norm_relu(w1, w2, 3, stride=2)]
        down += [conv_norm_relu(w2, w2, 3, stride=2) for _ in range(downsamplings - 2)]
        self.down = nn.Sequential(*down, ResidualBlock(w2))
        up: list[nn.Module] = []
        for out in [w2] * (downsamplings - 1) + [w1]:
            up += [nn.Upsample(scale_factor=2, mode="nearest"), conv_norm_relu(w2, out, 3)]
        self.up = nn.Sequential(*up)
        self.head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(w1, 1, 7))
        self.init_bias = init_bias

    def reset_head_bias(self) -> None:
        """Set the last convolution's bias to ``init_bias`` (call after weight init)."""
        nn.init.constant_(self.head[1].bias, self.init_bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-sigmoid score map ``[N, 1, H, W]``."""
        if self.coords:
            x = torch.cat([x, coordinate_channels(x)], dim=1)
        return forward_sequential(self.head, self.up(self.down(x)))  # fused on the CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))
