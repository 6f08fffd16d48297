"""Building blocks shared by the EDAAN networks (CycleGAN conventions) and ``set_requires_grad``.

- Instance norm without affine parameters and without running statistics, as CycleGAN's
  ``norm='instance'`` (``affine=False, track_running_stats=False``): a translator normalises
  each image by its own statistics, at training and test time alike.
- Convolutions feeding a norm have no bias (the norm would remove it); reflection padding in
  the generator and the attention net avoids the dark borders zero padding paints.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["ResidualBlock", "conv_norm_relu", "init_weights", "set_requires_grad"]


def instance_norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


def conv_norm_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Reflection pad -> conv (no bias) -> instance norm -> ReLU; keeps H, W at stride 1."""
    return nn.Sequential(
        nn.ReflectionPad2d(kernel // 2),
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, bias=False),
        instance_norm(out_ch),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """CycleGAN's ResNet block: ``x + IN(conv3(relu(IN(conv3(x)))))`` with reflection padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=False),
            instance_norm(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=False),
            instance_norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def init_weights(module: nn.Module, gain: float = 0.02) -> None:
    """CycleGAN's ``init_type='normal'``: conv/linear weights ~ N(0, 0.02), biases 0; BN weights
    ~ N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)


def set_requires_grad(modules: nn.Module | Iterable[nn.Module | None] | None,
                      requires_grad: bool) -> None:
    """Sets ``requires_grad`` of every parameter of ``modules`` (``None`` entries are skipped).

    Used by the generator step to keep the discriminators out of the generator's graph, and to
    freeze the attention nets after the first phase (paper §IV-B), as CycleGAN does.
    """
    if modules is None:
        return
    if isinstance(modules, nn.Module):
        modules = [modules]
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            p.requires_grad_(requires_grad)
