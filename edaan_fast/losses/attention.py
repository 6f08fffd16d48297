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

__all__ = ["CONSISTENCY_MODES", "attention_area_loss", "attention_consistency_loss",
           "attention_smoothness_loss", "mask_guidance_loss"]


#: How eq. (5)'s two sides learn: ``symmetric`` (as printed: both maps get gradients),
#: ``real-target`` (the maps of the real images are fixed targets for the maps of the
#: translations), ``translated-target`` (the other way round), ``source-teacher`` (``A_S``'s
#: maps are the targets on both sides: ``A_T`` learns from ``A_S`` on ``x_ST`` and on the real
#: target images through ``A_S(x_TS)``; ``A_S`` learns from the adversarial and cycle terms).
CONSISTENCY_MODES = ("symmetric", "real-target", "translated-target", "source-teacher")


def attention_consistency_loss(attn_s: torch.Tensor, attn_t_of_st: torch.Tensor,
                               attn_t: torch.Tensor, attn_s_of_ts: torch.Tensor,
                               mode: str = "symmetric") -> torch.Tensor:
    """``mean|A_S(x_S) - A_T(x_ST)| + mean|A_T(x_T) - A_S(x_TS)|`` in float32 (eq. 5).

    ``mode`` (:data:`CONSISTENCY_MODES`) decides which side of each difference is a target
    (no gradient); the value is the same in every mode. The symmetric form is minimised by any
    pair of equal constant maps, and at ``λ_attn = 10`` that pull flattens both maps
    (docs/attention.md has the measurements). With ``translated-target`` the maps of the real
    images learn from the maps of their translations, which the cycle loss trains to keep the
    person (kept exactly by eq. (1)) and re-translate the background.
    """
    if mode not in CONSISTENCY_MODES:
        raise ValueError(f"attention_consistency_loss: mode must be one of "
                         f"{', '.join(CONSISTENCY_MODES)}; got {mode!r}")
    if mode == "real-target":
        attn_s, attn_t = attn_s.detach(), attn_t.detach()
    elif mode == "translated-target":
        attn_t_of_st, attn_s_of_ts = attn_t_of_st.detach(), attn_s_of_ts.detach()
    elif mode == "source-teacher":
        attn_s, attn_s_of_ts = attn_s.detach(), attn_s_of_ts.detach()
    return (F.l1_loss(attn_t_of_st.float(), attn_s.float())
            + F.l1_loss(attn_s_of_ts.float(), attn_t.float()))


def target_attention_refinement(attention_T, x_st: torch.Tensor,
                                attn_s: torch.Tensor) -> torch.Tensor:
    """``mean|A_T(x_ST) - A_S(x_S)|`` with ``x_ST`` and ``A_S(x_S)`` fixed (float32).

    The real-target half of eq. (5) on its own, for after the phase switch: ``A_S`` is frozen
    and ``A_T`` keeps learning its map from translations of a generator that is still
    improving, so it sees target-style backgrounds closer to the real ones than the early
    translations it learnt from before the switch (docs/attention.md §8).
    """
    return F.l1_loss(attention_T(x_st.detach()).float(), attn_s.detach().float())


def attention_smoothness_loss(*maps: torch.Tensor) -> torch.Tensor:
    """Total variation of attention maps, ``mean|A[y+1] - A[y]| + mean|A[x+1] - A[x]|``,
    summed over ``maps`` (each ``[N, 1, H, W]``), in float32.

    The mask regulariser of AttentionGAN (Tang et al., 2019) and GANimation (Pumarola et al.,
    2018): a map that keeps a whole person and translates the whole background changes only
    along the person's outline, while a noisy map pays at every pixel.
    """
    total = maps[0].new_zeros((), dtype=torch.float32)
    for a in maps:
        a = a.float()
        total = total + (a[..., 1:, :] - a[..., :-1, :]).abs().mean() \
            + (a[..., 1:] - a[..., :-1]).abs().mean()
    return total


def attention_area_loss(*maps: torch.Tensor, budget: float = 0.0) -> torch.Tensor:
    """How much more of each image the maps keep than ``budget``: the mean over images of
    ``max(mean(A) - budget, 0)``, summed over ``maps`` (each ``[N, 1, H, W]``), in float32.

    With ``budget = 0`` it is the mean of the map, the L1 mask penalty of GANimation (Pumarola
    et al., 2018: "the attention mask can easily saturate to 1, which makes the generator have
    no effect") and of Attention-GAN for object transfiguration (Chen et al., 2018, the paper's
    ref. [49]), in EDAAN's convention where ``A = 1`` keeps the real pixel. Every term of eq.
    (9) but the adversarial ones is smallest when nothing is translated (the identity map is
    cycle-consistent and pairs ``x_ST`` with ``x_S``), so without a price on keeping the maps
    drift to 1 (docs/attention.md, "Real images"). A ``budget`` (the fraction of a crop the
    person covers) leaves an image alone once it keeps no more than that, so the price only
    stops the drift and the other terms decide *where* the kept pixels go.
    """
    total = maps[0].new_zeros((), dtype=torch.float32)
    for a in maps:
        kept = a.float().flatten(1).mean(1)
        total = total + (kept - budget).clamp_min(0).mean()
    return total


def mask_guidance_loss(*pairs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Sum over ``(map, mask)`` pairs of the mean binary cross-entropy between an attention map
    ``[N, 1, H, W]`` in ``[0, 1]`` and a person mask of the same shape (float32; the map is
    clamped to ``[1e-4, 1 - 1e-4]`` so a saturated pixel costs at most ``ln 1e4``).

    Not in the paper: the mask supervision of attention of MGCAM (Song et al., CVPR 2018) and
    the segmenter-guided translation of PTGAN (Wei et al., CVPR 2018), with masks from an
    off-the-shelf person segmenter on the *training* crops of both domains (no identity labels
    of the target). ``train --mask-guidance`` (docs/attention.md, "Real images").
    """
    if not pairs:
        raise ValueError("mask_guidance_loss: expected at least one (map, mask) pair")
    total = None
    for attention, mask in pairs:
        if attention.shape != mask.shape:
            raise ValueError(f"mask_guidance_loss: map {list(attention.shape)} and mask "
                             f"{list(mask.shape)} differ in shape")
        term = F.binary_cross_entropy(attention.float().clamp(1e-4, 1 - 1e-4), mask.float())
        total = term if total is None else total + term
    return total
