"""Cycle-consistency loss of EDAAN (paper eq. 4).

Paper symbols -> code: ``L_cyc = E[|x_STS - x_S|_1] + E[|x_TST - x_T|_1]`` with the
reconstructions ``EDAANOutput.rec_S`` / ``rec_T`` (``F(G(x_S))`` and ``G(F(x_T))``, or eq. (4)'s
literal generator-only chain, see :class:`edaan_fast.models.ModelConfig`). ``|.|_1`` is the mean
absolute error over pixels, as in CycleGAN; weighted by ``λ_cyc`` (10) in the objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cycle_loss"]


def cycle_loss(x_s: torch.Tensor, rec_s: torch.Tensor, x_t: torch.Tensor,
               rec_t: torch.Tensor) -> torch.Tensor:
    """``mean|rec_S - x_S| + mean|rec_T - x_T|`` in float32 (eq. 4)."""
    return F.l1_loss(rec_s.float(), x_s.float()) + F.l1_loss(rec_t.float(), x_t.float())
