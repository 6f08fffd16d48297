"""Attention-consistency loss of EDAAN (paper eq. 5).

Paper symbols -> code: ``L_attn = E[|A_S(x_S) - A_T(G(x_S))|_1] + E[|A_T(x_T) - A_S(F(x_T))|_1]``
with ``A_S(x_S)`` = ``out.s2t.attention``, ``A_T(G(x_S))`` = ``out.attention_T_of_ST``,
``A_T(x_T)`` = ``out.t2s.attention``, ``A_S(F(x_T))`` = ``out.attention_S_of_TS``: the person a
translation keeps must be the person the other domain's attention net finds in the result.
``|.|_1`` is the mean absolute difference per pixel. Eq. (9) writes the term as
``λ_attn (L_attn(A_S) + L_attn(A_T))``: the two summands here are those two parts, and the
objective weights their sum by ``λ_attn`` (10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention_consistency_loss"]


def attention_consistency_loss(attn_s: torch.Tensor, attn_t_of_st: torch.Tensor,
                               attn_t: torch.Tensor, attn_s_of_ts: torch.Tensor,
                               one_sided: bool = False) -> torch.Tensor:
    """``mean|A_S(x_S) - A_T(x_ST)| + mean|A_T(x_T) - A_S(x_TS)|`` in float32 (eq. 5).

    With ``one_sided`` the maps of the real images, ``A_S(x_S)`` and ``A_T(x_T)``, are targets
    (no gradient): each net learns to find on the other domain's translations the person the
    other net found on its real images, and neither is pulled towards the other's map on its
    own domain. Both forms have the same value; only the gradient differs. Why: the symmetric
    form is minimised by any pair of equal constant maps, and at ``λ_attn = 10`` that pull
    flattens both maps (see docs/attention.md for the measurements).
    """
    if one_sided:
        attn_s, attn_t = attn_s.detach(), attn_t.detach()
    return (F.l1_loss(attn_t_of_st.float(), attn_s.float())
            + F.l1_loss(attn_s_of_ts.float(), attn_t.float()))
