"""Adversarial losses of EDAAN (paper eq. 3), in the least-squares (LSGAN) form CycleGAN uses.

Paper symbols -> code: ``L_GAN^S`` (eq. 3: the S -> T mapping ``G`` against ``D_T``) is
``lsgan_generator_loss(D_T(x_ST))`` for the generator and ``lsgan_discriminator_loss(D_T(x_T),
D_T(x_ST))`` for ``D_T``; ``L_GAN^T`` is the same with ``F``/``D_S``/``x_TS``/``x_S``. Eq. (3)'s
``log D`` / ``log(1 - D)`` is replaced by squared errors to the labels 1 (real) and 0 (fake),
Mao et al.'s LSGAN, as in CycleGAN (``gan_mode='lsgan'``): more stable, no saturation.

Phase (§IV-B): for the first 30 epochs the discriminators see whole images; afterwards only the
background ``(1 - A(x)) * x`` (:func:`discriminator_input` with ``masked=True``, computed by the
fused ``mask_background``). The mask there is detached: it selects *where* the discriminator
looks and must not become a way for the attention net to hide the image from it. With a
threshold ``τ > 0`` the mask is binarised first, as Mejjati et al. (NeurIPS 2018) do for their
attention-masked discriminator (``τ = 0.1``): the discriminator sees, unscaled, every pixel the
translation changes by more than ``τ`` (``1 - A > τ``) and nothing else.
All losses are computed in float32 whatever the autocast dtype of the scores.
"""

from __future__ import annotations

import torch

from edaan_fast.ops import mask_background

__all__ = ["discriminator_input", "lsgan_discriminator_loss", "lsgan_generator_loss"]


def lsgan_generator_loss(pred_fake: torch.Tensor) -> torch.Tensor:
    """The generator's LSGAN term: ``mean((D(fake) - 1)^2)`` (fakes should score as real)."""
    return (pred_fake.float() - 1.0).pow(2).mean()


def lsgan_discriminator_loss(pred_real: torch.Tensor, pred_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's LSGAN term: ``0.5 * (mean((D(real) - 1)^2) + mean(D(fake)^2))``.

    The factor 0.5 is CycleGAN's (it slows ``D`` relative to ``G``).
    """
    return 0.5 * ((pred_real.float() - 1.0).pow(2).mean() + pred_fake.float().pow(2).mean())


def discriminator_input(x: torch.Tensor, mask: torch.Tensor | None, masked: bool,
                        threshold: float = 0.0) -> torch.Tensor:
    """What a discriminator sees: ``x`` (first phase) or its background ``(1 - mask) * x``.

    Args:
        x: ``[N, C, H, W]`` images (real, or translated).
        mask: ``[N, 1, H, W]`` foreground map ``A(x)`` of the image's source (for a translation
            ``x_ST`` that is ``A_S(x_S)``), or ``None`` (no attention: always the whole image).
        masked: the phase flag ``masked_discriminator``.
        threshold: ``τ``; ``0`` uses the soft map (the paper), ``τ > 0`` the binarised
            background ``1 - A > τ`` (Mejjati et al.'s ``τ = 0.1``).
    """
    if not masked or mask is None:
        return x
    mask = mask.detach()
    if threshold > 0:
        mask = (mask >= 1.0 - threshold).to(mask.dtype)
    return mask_background(x, mask)
