"""EDAAN: both translation directions, the attention nets, the discriminators and the re-ID
module in one ``nn.Module`` (paper §III, eq. 1-9).

Paper symbols -> code (the subscript of ``E``, ``G`` and ``A`` names the domain of the *input*):

=========================================  ===================================================
``x_S``, ``x_T``                           real source / target images (normalised)
``E_S``, ``G_S``, ``A_S``, ``D_S``         ``encoder_S``, ``generator_S``, ``attention_S``,
                                           ``discriminator_S``
``E_T``, ``G_T``, ``A_T``, ``D_T``         ``encoder_T``, ``generator_T``, ``attention_T``,
                                           ``discriminator_T``
``G_S(E_S(x_S)) : S -> T``                 ``Translation.generated`` of :meth:`EDAAN.s2t`
``G(x_S)`` = ``x_ST`` (eq. 1)              :meth:`EDAAN.translate_s2t`:
                                           ``mask_blend(x_S, G_S(E_S(x_S)), A_S(x_S))``
``F(x_T)`` = ``x_TS`` (eq. 2)              :meth:`EDAAN.translate_t2s`:
                                           ``mask_blend(x_T, G_T(E_T(x_T)), A_T(x_T))``
cycle reconstructions (eq. 4)              ``EDAANOutput.rec_S`` = ``F(G(x_S))``,
                                           ``rec_T`` = ``G(F(x_T))`` (see below)
``A_T(G(x_S))``, ``A_S(F(x_T))`` (eq. 5)   ``EDAANOutput.attention_T_of_ST``, ``attention_S_of_TS``
``D_T`` judges ``x_ST``, ``D_S`` ``x_TS``  :mod:`edaan_fast.losses.adversarial` (eq. 3)
re-ID module on ``E_S`` (eq. 6-8)          ``reid_head``; :class:`ReIDOutput`
=========================================  ===================================================

So ``G_S`` (fed with *source* images) renders them in the *target* style, and ``D_T`` is its
adversary. With ``cycle_through_attention`` (default) the reconstruction of ``x_S`` runs the
full mapping back, ``F(x_ST) = mask_blend(x_ST, G_T(E_T(x_ST)), A_T(x_ST))``, which also
yields eq. (5)'s ``A_T(x_ST)`` at no extra cost; otherwise it is eq. (4)'s literal
``G_T(E_T(G_S(E_S(x_S))))``. With ``no_attention`` there are no attention nets, the
translation is the generator's output (CycleGAN / "w/o attention"), and the maps are ``None``.

The discriminators live here so that one ``state_dict`` holds the whole model, but
:meth:`EDAAN.forward` never calls them: the objective does. The model owns no optimiser; use
:meth:`generator_parameters` and :meth:`discriminator_parameters` to build them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from edaan_fast.ops import mask_blend

from .attention import AttentionNet
from .blocks import init_weights
from .config import ModelConfig, model_config
from .discriminator import PatchDiscriminator
from .generator import Encoder, Generator
from .reid_head import ReIDHead, ReIDOutput

__all__ = ["EDAAN", "EDAANOutput", "Translation", "build_model"]


@dataclass
class Translation:
    """One direction's mapping of a batch (eq. 1 for S -> T, eq. 2 for T -> S).

    Attributes:
        image: the translation ``x_ST = A * x + (1 - A) * G(E(x))`` ``[N, C, H, W]`` (the plain
            generator output when the model has no attention).
        generated: the generator output ``G_d(E_d(x))`` ``[N, C, H, W]``.
        attention: the foreground map ``A_d(x)`` ``[N, 1, H, W]`` in ``[0, 1]``, or ``None``.
        features: the encoder output ``E_d(x)`` ``[N, feature_dim, H/4, W/4]``.
    """

    image: torch.Tensor
    generated: torch.Tensor
    attention: torch.Tensor | None
    features: torch.Tensor


@dataclass
class EDAANOutput:
    """Everything one training forward computes for a source batch and a target batch.

    Attributes:
        s2t: S -> T mapping of ``x_S`` (``s2t.image`` = ``x_ST``, ``s2t.attention`` =
            ``A_S(x_S)``).
        t2s: T -> S mapping of ``x_T`` (``t2s.image`` = ``x_TS``, ``t2s.attention`` =
            ``A_T(x_T)``).
        rec_S: cycle reconstruction of ``x_S`` (eq. 4).
        rec_T: cycle reconstruction of ``x_T`` (eq. 4).
        attention_T_of_ST: ``A_T(x_ST)`` (eq. 5) or ``None`` without attention.
        attention_S_of_TS: ``A_S(x_TS)`` (eq. 5) or ``None`` without attention.
        reid: re-ID outputs of ``E_S`` on ``cat([x_S, x_ST])`` (2N rows: the real source images,
            then their translations, which share the source labels), or ``None`` if not asked.
    """

    s2t: Translation
    t2s: Translation
    rec_S: torch.Tensor
    rec_T: torch.Tensor
    attention_T_of_ST: torch.Tensor | None
    attention_S_of_TS: torch.Tensor | None
    reid: ReIDOutput | None


class EDAAN(nn.Module):
    """The EDAAN networks of both domains; see the module docstring for the symbol mapping."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        cfg = config if config is not None else model_config("paper")
        self.config = cfg
        c, w, d = cfg.in_channels, cfg.gen_width, cfg.gen_downsamplings
        enc_blocks = cfg.encoder_blocks
        dec_blocks = cfg.gen_res_blocks - enc_blocks

        def encoder() -> Encoder:
            return Encoder(c, w, d, enc_blocks)

        def generator() -> Generator:
            return Generator(c, w, d, dec_blocks, cfg.pixel_mean, cfg.pixel_std)

        self.encoder_S, self.encoder_T = encoder(), encoder()
        self.generator_S, self.generator_T = generator(), generator()
        if cfg.no_attention:
            self.attention_S = self.attention_T = None
        else:
            def attention() -> AttentionNet:
                return AttentionNet(c, cfg.attn_widths, cfg.attn_init_bias,
                                    cfg.attn_downsamplings, cfg.attn_coords)

            self.attention_S = attention()
            self.attention_T = self.attention_S if cfg.shared_attention else attention()
        self.discriminator_S = PatchDiscriminator(c, cfg.disc_width, cfg.disc_layers)
        self.discriminator_T = PatchDiscriminator(c, cfg.disc_width, cfg.disc_layers)
        self.reid_head = ReIDHead(cfg.feature_dim, cfg.num_ids, cfg.reid_bottleneck,
                                  cfg.embedding_dim, cfg.dropout, cfg.reid_stripes)
        init_weights(self)
        for net in self.attention_nets():
            net.reset_head_bias()

    # ------------------------------------------------------------------ module groups

    @property
    def has_attention(self) -> bool:
        return self.attention_S is not None

    def attention_nets(self) -> list[nn.Module]:
        """``[A_S, A_T]`` (``[A_S]`` when they are one net; empty without attention)."""
        if not self.has_attention:
            return []
        if self.attention_T is self.attention_S:
            return [self.attention_S]
        return [self.attention_S, self.attention_T]

    def discriminators(self) -> list[nn.Module]:
        """``[D_S, D_T]``."""
        return [self.discriminator_S, self.discriminator_T]

    def generator_modules(self) -> list[nn.Module]:
        """Everything the generator step optimises: E, G, A of both domains and the re-ID head."""
        return [self.encoder_S, self.encoder_T, self.generator_S, self.generator_T,
                *self.attention_nets(), self.reid_head]

    def generator_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of :meth:`generator_modules` (for the generator optimiser)."""
        for m in self.generator_modules():
            yield from m.parameters()

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of ``D_S`` and ``D_T`` (for the discriminator optimiser)."""
        for m in self.discriminators():
            yield from m.parameters()

    # ------------------------------------------------------------------ mappings

    @staticmethod
    def _map(x: torch.Tensor, encoder: Encoder, generator: Generator,
             attention: AttentionNet | None) -> Translation:
        h = encoder(x)
        generated = generator(h)
        if attention is None:
            return Translation(generated, generated, None, h)
        a = attention(x)
        return Translation(mask_blend(x, generated, a), generated, a, h)

    def s2t(self, x_s: torch.Tensor) -> Translation:
        """The mapping ``G`` of eq. (1) with its intermediates."""
        return self._map(x_s, self.encoder_S, self.generator_S, self.attention_S)

    def t2s(self, x_t: torch.Tensor) -> Translation:
        """The mapping ``F`` of eq. (2) with its intermediates."""
        return self._map(x_t, self.encoder_T, self.generator_T, self.attention_T)

    def translate_s2t(self, x_s: torch.Tensor) -> torch.Tensor:
        """``x_ST = A_S(x_S) * x_S + (1 - A_S(x_S)) * G_S(E_S(x_S))`` (eq. 1)."""
        return self.s2t(x_s).image

    def translate_t2s(self, x_t: torch.Tensor) -> torch.Tensor:
        """``x_TS = A_T(x_T) * x_T + (1 - A_T(x_T)) * G_T(E_T(x_T))`` (eq. 2)."""
        return self.t2s(x_t).image

    def reid(self, x: torch.Tensor) -> ReIDOutput:
        """Re-ID outputs of the shared source encoder ``E_S`` on images ``x``."""
        return self.reid_head(self.encoder_S(x))

    @torch.no_grad()
    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        """Test-time retrieval features: ``embedding(pool(E_S(x)))`` ``[N, embedding_dim]``.

        Runs under ``no_grad``; put the model in ``eval()`` mode first.
        """
        return self.reid(x).embedding

    # ------------------------------------------------------------------ training forward

    def _cycle(self, start: torch.Tensor, fixed_maps: bool, fwd: Translation,
               back_encoder: Encoder, back_generator: Generator,
               back_attention: AttentionNet | None):
        """(reconstruction, back attention map ``A(x_translated)``) for one direction.

        ``start`` is the translation the cycle maps back: ``fwd.image``, or with ``fixed_maps``
        (no ``cycle_attention_grad``) the same blend with a detached map; the back blend then
        detaches its map too, so the cycle loss cannot reach the attention nets, and the back
        map (taken of ``start``) trains only the back net through eq. (5)."""
        if self.config.cycle_through_attention:
            back = self._map(start, back_encoder, back_generator, back_attention)
            if fixed_maps:
                return mask_blend(start, back.generated, back.attention.detach()), back.attention
            return back.image, back.attention
        rec = back_generator(back_encoder(fwd.generated))  # eq. (4) literally
        return rec, (back_attention(fwd.image) if back_attention is not None else None)

    def forward(self, x_s: torch.Tensor, x_t: torch.Tensor, with_reid: bool = True) -> EDAANOutput:
        """Both mappings, both cycles, eq. (5)'s maps, and (optionally) the re-ID outputs.

        Args:
            x_s: ``[N, C, H, W]`` source images.
            x_t: ``[M, C, H, W]`` target images (unlabelled).
            with_reid: also run ``E_S`` + re-ID head on ``cat([x_S, x_ST])``.
        """
        cfg = self.config
        s2t = self.s2t(x_s)
        t2s = self.t2s(x_t)
        cut_cycle = self.has_attention and not cfg.cycle_attention_grad
        cut_reid = self.has_attention and with_reid and not cfg.reid_attention_grad
        # x_ST with a detached map, blended once for whichever losses must not move A_S
        st_fixed = (mask_blend(x_s, s2t.generated, s2t.attention.detach())
                    if cut_cycle or cut_reid else None)
        st_start = st_fixed if cut_cycle else s2t.image
        ts_start = (mask_blend(x_t, t2s.generated, t2s.attention.detach()) if cut_cycle
                    else t2s.image)
        rec_s, a_t_of_st = self._cycle(st_start, cut_cycle, s2t,
                                       self.encoder_T, self.generator_T, self.attention_T)
        rec_t, a_s_of_ts = self._cycle(ts_start, cut_cycle, t2s,
                                       self.encoder_S, self.generator_S, self.attention_S)
        reid = None
        if with_reid:
            x_st = st_fixed if cut_reid else s2t.image
            features = torch.cat([s2t.features, self.encoder_S(x_st)], dim=0)
            reid = self.reid_head(features)
        return EDAANOutput(s2t, t2s, rec_s, rec_t, a_t_of_st, a_s_of_ts, reid)


def build_model(preset: str | ModelConfig = "paper", **overrides) -> EDAAN:
    """An :class:`EDAAN` from a preset name (``paper``, ``tiny``) or a config, with overrides.

    Raises:
        ValueError: for an unknown preset name, listing the choices.
    """
    cfg = preset if isinstance(preset, ModelConfig) else model_config(preset)
    return EDAAN(cfg.replace(**overrides) if overrides else cfg)
