"""Layout helpers the Python fake kernels share with csrc/ops/common.h."""

from __future__ import annotations

import torch


def suggest_memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last only when `t` is channels_last-contiguous and not plainly contiguous.

    Mirror of ``edaan_fast::suggest_memory_format`` (csrc/ops/common.h): the fake kernels must
    produce outputs with the strides the real kernels produce.
    """
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
