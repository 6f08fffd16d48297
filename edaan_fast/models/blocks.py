"""Building blocks shared by the EDAAN networks (CycleGAN conventions) and ``set_requires_grad``.

- Instance norm without affine parameters and without running statistics, as CycleGAN's
  ``norm='instance'`` (``affine=False, track_running_stats=False``): a translator normalises
  each image by its own statistics, at training and test time alike.
- Convolutions feeding a norm have no bias (the norm would remove it); reflection padding in
  the generator and the attention net avoids the dark borders zero padding paints.
- The narrow 7x7 output layers (``ReflectionPad2d + Conv2d`` to the image channels, or to the
  attention map's one channel) run as the fused :func:`~edaan_fast.ops.reflect_pad_conv2d` on
  the CPU (:func:`forward_sequential`); the modules, and so the ``state_dict`` keys, stay those
  of the plain ``nn.Sequential``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from edaan_fast.ops.reflect_pad_conv2d import MAX_OUT_CHANNELS, available, reflect_pad_conv2d

__all__ = ["ResidualBlock", "conv_norm_relu", "forward_sequential", "init_weights",
           "set_requires_grad"]

#: Whether :func:`forward_sequential` runs narrow reflection-padded convolutions as the fused
#: op (on the CPU, with the compiled library loaded). ``EDAAN_FAST_FUSED_OUTPUT_CONV=0`` or
#: setting this to False selects the plain ``ReflectionPad2d + Conv2d`` (oneDNN) path, e.g. to
#: time one against the other; both compute the same function with the same parameters.
FUSED_OUTPUT_CONV: bool = os.environ.get("EDAAN_FAST_FUSED_OUTPUT_CONV", "1").strip() != "0"

# edaan_fast.ops loads the library at import; a library built before the op has not got it.
_OP_LOADED: bool = available()


def _fusable(pad: nn.Module, conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``conv(pad(x))`` is what :func:`~edaan_fast.ops.reflect_pad_conv2d` computes and
    the fused op should run it: a stride-1 ``k x k`` convolution (k odd) to at most four
    channels after a reflection pad of ``(k - 1) / 2``, on a CPU tensor."""
    if not (FUSED_OUTPUT_CONV and _OP_LOADED and isinstance(pad, nn.ReflectionPad2d)
            and type(conv) is nn.Conv2d and x.device.type == "cpu" and x.dim() == 4):
        return False
    k = conv.kernel_size[0]
    p = (k - 1) // 2
    return (conv.kernel_size == (k, k) and k % 2 == 1
            and conv.out_channels <= MAX_OUT_CHANNELS and conv.groups == 1
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding == (0, 0)
            and tuple(pad.padding) == (p, p, p, p) and p < x.shape[-2] and p < x.shape[-1])


def forward_sequential(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)``, with each ``ReflectionPad2d`` + narrow ``Conv2d`` pair that
    :func:`~edaan_fast.ops.reflect_pad_conv2d` computes run as that one op on the CPU (the
    7x7 output layers: oneDNN spends as long on 1 or 3 output channels as on 16)."""
    modules = list(layers)
    i = 0
    while i < len(modules):
        if i + 1 < len(modules) and _fusable(modules[i], modules[i + 1], x):
            conv = modules[i + 1]
            x = reflect_pad_conv2d(x, conv.weight, conv.bias)
            i += 2
        else:
            x = modules[i](x)
            i += 1
    return x


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
