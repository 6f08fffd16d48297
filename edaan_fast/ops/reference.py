"""Pure-PyTorch twins of the fused ops: the test oracle and the explicit fallback.

Each function here computes what its fused op computes, with plain (eager, autograd-tracked)
PyTorch. They are selected instead of the compiled kernels only on request
(``EDAAN_FAST_OPS=reference`` or :func:`edaan_fast.ops.set_reference_ops`).
"""

from __future__ import annotations

import torch


def mask_blend(fg: torch.Tensor, bg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """EDAAN eq. (1): ``mask * fg + (1 - mask) * bg``, mask broadcast over channels."""
    return mask * fg + (1 - mask) * bg


def mask_background(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The discriminator's background-only input: ``(1 - mask) * x``."""
    return (1 - mask) * x
