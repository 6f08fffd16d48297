"""The overall EDAAN objective (paper eq. 9), term by term.

Paper symbols -> code (``GeneratorLosses`` field: what it is):

=====================  ===================================================================
``gan_s2t``            ``L_GAN^S`` (eq. 3): LSGAN loss of ``G: S -> T`` against ``D_T``
``gan_t2s``            ``L_GAN^T``: LSGAN loss of ``F: T -> S`` against ``D_S``
``cycle``              ``L_cyc`` (eq. 4), weighted by ``λ_cyc``
``attention``          ``L_attn(A_S) + L_attn(A_T)`` (eq. 5), weighted by ``λ_attn``
``smoothness``         total variation of ``A_S(x_S)`` and ``A_T(x_T)`` (a mask regulariser,
                       not in eq. 9), weighted by ``λ_tv`` (0 = the paper's objective)
``area``               the kept area of ``A_S(x_S)`` and ``A_T(x_T)`` beyond a budget (a mask
                       regulariser, not in eq. 9), weighted by ``λ_area`` (0 = the paper's)
``metric``             ``L_quartet`` (eq. 7) or ``L_triplet`` (eq. 6), weighted by ``λ_quartet``
                       (``LossWeights.metric``)
``id``                 ``L_id`` (eq. 8), weighted by ``λ_id``
``refine``             after the phase switch with ``--attention-refine`` only (not in eq. 9):
                       ``mean|A_T(x_ST) - A_S(x_S)|`` with both right-hand maps fixed, weighted
                       by ``λ_attn``; 0 otherwise
``total``              ``gan_s2t + gan_t2s + λ_cyc cycle + λ_attn attention
                       + λ_tv smoothness + λ_area area + λ_quartet metric + λ_id id
                       (+ λ_attn refine)``
=====================  ===================================================================

Eq. (9) as printed has no separate cycle term: "an attention loss is used within the
cycle-consistency loss". Without a cycle term an unpaired translator is unconstrained (the
paper's own argument for eq. 4), so the cycle loss is kept with CycleGAN's ``λ_cyc = 10``; set
``LossWeights(cycle=0)`` for the printed form. The re-ID terms see ``E_S`` on the real source
images and their S -> T translations, both with the source labels (2N rows).

The metric loss is a module passed in (``QuartetLoss(margin=0.3)`` by default in the trainer,
or ``TripletLoss``, or any ``loss(embedding, labels) -> scalar``); ``None`` drops the term.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from .adversarial import discriminator_input, lsgan_discriminator_loss, lsgan_generator_loss
from .attention import (
    attention_area_loss,
    attention_consistency_loss,
    attention_smoothness_loss,
    mask_guidance_loss,
    target_attention_refinement,
)
from .cycle import cycle_loss
from .identity import id_loss

__all__ = ["DiscriminatorLosses", "EDAANObjective", "GeneratorLosses", "LossWeights"]


@dataclass(frozen=True)
class LossWeights:
    """The ``λ`` of eq. (9). Defaults: the paper's ``λ_attn = 10, λ_quartet = 1, λ_id = 1``, and
    CycleGAN's ``λ_cyc = 10``; ``gan`` scales both adversarial terms (1 in the paper);
    ``metric`` is the paper's ``λ_quartet``, the weight of the metric loss (quartet or triplet;
    ``train --lambda-metric``, logged as ``metric``); ``attention_tv`` weighs the attention
    maps' total variation and ``attention_area`` their kept area beyond ``area_budget``;
    ``mask_guidance`` the maps' cross-entropy against person masks of training crops (all three
    0 in the paper)."""

    gan: float = 1.0
    cycle: float = 10.0
    attention: float = 10.0
    metric: float = 1.0
    attention_tv: float = 0.0
    id: float = 1.0
    attention_area: float = 0.0
    area_budget: float = 0.0
    mask_guidance: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not v >= 0.0:
                raise ValueError(f"LossWeights.{f.name} must be a non-negative number, got {v!r}")


@dataclass
class GeneratorLosses:
    """The generator-side terms of eq. (9) (float32 scalar tensors) and their weighted total."""

    gan_s2t: torch.Tensor
    gan_t2s: torch.Tensor
    cycle: torch.Tensor
    attention: torch.Tensor
    smoothness: torch.Tensor
    area: torch.Tensor
    metric: torch.Tensor
    id: torch.Tensor
    refine: torch.Tensor
    guide: torch.Tensor
    total: torch.Tensor

    def terms(self) -> dict[str, torch.Tensor]:
        """The named tensors, ``total`` last."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class DiscriminatorLosses:
    """``D_S`` and ``D_T`` LSGAN losses (eq. 3, discriminator side) and their sum."""

    d_S: torch.Tensor
    d_T: torch.Tensor
    total: torch.Tensor

    def terms(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class EDAANObjective(nn.Module):
    """Eq. (9) for the generator step and eq. (3) for the discriminator step.

    Args:
        metric_loss: ``loss(embedding [2N, d], labels [2N]) -> scalar`` for eq. (6)/(7), e.g.
            ``edaan_fast.losses.QuartetLoss(margin=0.3)``; ``None`` leaves it out (term 0).
        weights: the ``λ`` of eq. (9).
        label_smoothing: of the identity loss (0 = plain eq. 8).
        attention_consistency: which side of eq. (5) learns (see
            :func:`~edaan_fast.losses.attention.attention_consistency_loss`).
        binary_mask: ``τ`` of the masked discriminators' binarised mask (see
            :func:`~edaan_fast.losses.adversarial.discriminator_input`); 0 = the soft mask.
    """

    def __init__(self, metric_loss: nn.Module | None = None,
                 weights: LossWeights | None = None, label_smoothing: float = 0.0,
                 attention_consistency: str = "symmetric", binary_mask: float = 0.0):
        super().__init__()
        self.attention_consistency = attention_consistency
        self.binary_mask = float(binary_mask)
        self.metric_loss = metric_loss
        self.weights = weights if weights is not None else LossWeights()
        self.label_smoothing = label_smoothing

    def weighted_total(self, gan_s2t, gan_t2s, cycle, attention, metric, id_,
                       smoothness=0.0, area=0.0) -> torch.Tensor:
        w = self.weights
        return (w.gan * (gan_s2t + gan_t2s) + w.cycle * cycle + w.attention * attention
                + w.attention_tv * smoothness + w.attention_area * area + w.metric * metric
                + w.id * id_)

    def generator_losses(self, model, out, x_s: torch.Tensor, x_t: torch.Tensor,
                         labels: torch.Tensor | None, masked_discriminator: bool,
                         refine_target_attention: bool = False,
                         guide_pairs: tuple = ()) -> GeneratorLosses:
        """All generator-side terms of eq. (9) for one forward ``out = model(x_s, x_t)``.

        Args:
            model: the :class:`edaan_fast.models.EDAAN` (its discriminators score the fakes).
            out: its :class:`edaan_fast.models.EDAANOutput`.
            x_s, x_t: the real batches ``out`` was computed from.
            labels: int64 ``[N]`` source identities (``None`` or ``out.reid is None``: no re-ID
                terms).
            masked_discriminator: the phase flag (discriminators see backgrounds only).
            refine_target_attention: add ``λ_attn *``
                :func:`~edaan_fast.losses.attention.target_attention_refinement` (``refine``;
                the caller lets only ``A_T`` learn from it, after the phase switch).
            guide_pairs: ``(attention map, person mask)`` pairs of the training crops for
                ``weights.mask_guidance *``
                :func:`~edaan_fast.losses.attention.mask_guidance_loss` (``guide``; none: 0).
        """
        zero = x_s.new_zeros((), dtype=torch.float32)
        fake_st = self.discriminator_view(out.s2t.image, out.s2t.attention, masked_discriminator)
        fake_ts = self.discriminator_view(out.t2s.image, out.t2s.attention, masked_discriminator)
        gan_s2t = lsgan_generator_loss(model.discriminator_T(fake_st))
        gan_t2s = lsgan_generator_loss(model.discriminator_S(fake_ts))
        cyc = cycle_loss(x_s, out.rec_S, x_t, out.rec_T)
        if out.attention_T_of_ST is not None:
            attn = attention_consistency_loss(out.s2t.attention, out.attention_T_of_ST,
                                              out.t2s.attention, out.attention_S_of_TS,
                                              self.attention_consistency)
        else:
            attn = zero
        smooth = area = zero
        if out.s2t.attention is not None:
            # logged even at λ_tv = λ_area = 0 (measures of the maps), without a backward then
            grad = torch.is_grad_enabled()
            with torch.set_grad_enabled(grad and self.weights.attention_tv > 0):
                smooth = attention_smoothness_loss(out.s2t.attention, out.t2s.attention)
            with torch.set_grad_enabled(grad and self.weights.attention_area > 0):
                area = attention_area_loss(out.s2t.attention, out.t2s.attention,
                                           budget=self.weights.area_budget)
        metric = ident = zero
        if out.reid is not None and labels is not None:
            both = torch.cat([labels, labels])
            ident = id_loss(out.reid.logits, both, self.label_smoothing)
            if self.metric_loss is not None:
                metric = self.metric_loss(out.reid.embedding.float(), both).float()
        total = self.weighted_total(gan_s2t, gan_t2s, cyc, attn, metric, ident, smooth, area)
        refine = zero
        if refine_target_attention and out.s2t.attention is not None:
            refine = target_attention_refinement(model.attention_T, out.s2t.image,
                                                 out.s2t.attention)
            total = total + self.weights.attention * refine
        guide = zero
        if guide_pairs:
            guide = mask_guidance_loss(*guide_pairs)
            total = total + self.weights.mask_guidance * guide
        return GeneratorLosses(gan_s2t, gan_t2s, cyc, attn, smooth, area, metric, ident, refine,
                               guide, total)

    def discriminator_view(self, x: torch.Tensor, mask: torch.Tensor | None,
                           masked: bool) -> torch.Tensor:
        """What a discriminator sees of ``x`` in this phase (the objective's ``binary_mask``)."""
        return discriminator_input(x, mask, masked, self.binary_mask)

    def discriminator_losses(self, model, real_s: torch.Tensor, real_t: torch.Tensor,
                             fake_st: torch.Tensor, fake_ts: torch.Tensor
                             ) -> DiscriminatorLosses:
        """``D_T`` on real ``x_T`` vs ``x_ST``, ``D_S`` on real ``x_S`` vs ``x_TS`` (eq. 3).

        All four inputs are what the discriminators should see (already masked in the second
        phase, see :func:`discriminator_input`) and detached from the generators.
        """
        d_t = lsgan_discriminator_loss(model.discriminator_T(real_t),
                                       model.discriminator_T(fake_st))
        d_s = lsgan_discriminator_loss(model.discriminator_S(real_s),
                                       model.discriminator_S(fake_ts))
        return DiscriminatorLosses(d_s, d_t, d_s + d_t)
