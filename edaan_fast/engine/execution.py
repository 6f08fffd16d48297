"""How the training step executes, apart from its precision (:mod:`.precision`): the memory
format of the networks and their inputs, ``torch.compile``, and the optimiser's kernel.

One place decides these for the trainer, the benchmarks and the profile
(``benchmarks/profile_train_step.py``); each choice is measured in docs/training.md
("Throughput") and benchmarks/RESULTS.md:

- ``channels_last``: convolution weights and the step's images in NHWC. Off by default: on
  the CPU the instance norms of every block take NCHW copies of their input, and the step was
  slower (see the measurement); it stays selectable for GPUs, where cuDNN prefers NHWC.
- ``compile``: ``nn.Module.compile()`` of every sub-network in place (``train --compile``);
  state-dict names stay those of the plain model.
- ``fused_optimizer``: Adam's single fused kernel (``torch.optim.Adam(fused=True)``, CPU and
  CUDA) instead of a loop of small per-parameter ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ExecutionOptions", "prepare_model", "to_layout"]


@dataclass(frozen=True)
class ExecutionOptions:
    """The execution choices of :func:`prepare_model` (defaults: what the trainer runs)."""

    channels_last: bool = False
    compile: bool = False
    fused_optimizer: bool = True


def prepare_model(model: nn.Module, options: ExecutionOptions) -> nn.Module:
    """Puts ``model`` (already on its device) in the memory format of ``options`` and compiles
    its sub-networks in place when asked; returns it."""
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    if options.compile:
        for module in model.children():
            module.compile()
    return model


def to_layout(x: torch.Tensor, options: ExecutionOptions) -> torch.Tensor:
    """A batch of images in the memory format of ``options``."""
    if options.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
