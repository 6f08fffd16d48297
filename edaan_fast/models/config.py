"""Typed configuration of the EDAAN networks, with the named presets ``paper`` and ``tiny``.

The paper (§III, §IV-B) fixes the re-ID head (128-d classifier bottleneck, dropout 0.5, 128-d
embedding) but not the layer widths of its Fig. 3, and no code of the authors is public. The
``paper`` preset therefore follows the conventions EDAAN builds on: CycleGAN's ResNet-9
generator (64 -> 128 -> 256, reflection padding, instance norm), its 70x70 PatchGAN
(64/128/256/512), and the attention network of Mejjati et al. (NeurIPS 2018, 32/64 channels).
The ``tiny`` preset keeps every structural choice and shrinks widths, depths and the input
(64x32) so that a 2-core CPU trains it in minutes. Its attention nets are half Mejjati's widths
(16/32), not a quarter like the rest: at 8/16 the source map missed heads and textured clothing
(docs/attention.md §10).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["ModelConfig", "MODEL_PRESETS", "model_config"]


@dataclass(frozen=True)
class ModelConfig:
    """Widths, depths and switches of :class:`edaan_fast.models.EDAAN`.

    Attributes:
        image_size: ``(H, W)`` of the inputs; both must be divisible by
            ``2 ** gen_downsamplings`` and by 4 (the attention net's two stride-2 stages) and at
            least :attr:`min_image_size` (24x24 for both presets). Non-square person crops
            (256x128) are the normal case.
        in_channels: image channels (3).
        gen_width: channels of the generator's first 7x7 conv (CycleGAN ``ngf`` = 64).
        gen_downsamplings: stride-2 3x3 convs in the encoder, each doubling the width
            (2: 64 -> 128 -> 256, as CycleGAN).
        gen_res_blocks: residual blocks at the bottleneck in total (CycleGAN: 9 for 256 px).
        encoder_res_blocks: how many of them belong to the encoder ``E_d`` (the rest open the
            decoder ``G_d``). ``None`` = the first half, rounded up (5 of 9): the split is "at the
            bottleneck", so the re-ID module (which shares ``E_S``) sees features that the
            translation also has to go through, and ``G_d`` still holds residual capacity of its
            own for the translation.
        attn_widths: channels of the attention net's first and later stride-2 stages
            (Mejjati: 32, 64).
        attn_downsamplings: stride-2 stages of the attention net (Mejjati: 2). Each one more
            doubles the field of view of its residual block: with 2 a map score sees about 40
            pixels, a third of a 64x32 person crop's height and a sixth of a 256x128 one's.
        disc_width: channels of the PatchGAN's first conv (64).
        disc_layers: stride-2 4x4 convs of the PatchGAN after the first (3 -> 70x70 field,
            64/128/256/512).
        num_ids: identities of the source training split (size of the classifier's output).
        reid_bottleneck: width of the classifier's hidden FC (paper §IV-B: 128).
        embedding_dim: width of the metric-loss embedding FC (paper §IV-B: 128).
        dropout: classifier dropout (paper §IV-B: 0.5).
        reid_stripes: horizontal bands the re-ID "feature vector" averages the encoder map over
            (part pooling as in PCB, Sun et al. ECCV 2018), giving ``feature_dim *
            reid_stripes`` features; 1 = one global average. Not 1 by default: the encoder's
            maps are instance-normalised (no affine), which gives every channel of every image
            the same spatial mean, so a global average is almost the same vector for every
            image (measured on the tiny preset's synthetic images: across-image standard
            deviation 0.015 per feature against 1.2 within an image) and neither re-ID head
            can learn from it. Band averages keep where on the body a channel responds: 4 bands
            vary 17x more across images. Target rank-1 / mAP on the embedded set (tiny, 80
            epochs): EDAAN 8.0 / 15.2 with a global average, 32.0 / 40.0 with 4 bands; direct
            transfer 9.0 / 14.4 and 8.0 / 17.9.
        no_attention: drop the attention nets; the translation is the plain generator output
            (the paper's "w/o attention" rows and the CycleGAN baseline).
        attn_init_bias: initial bias of the attention net's last convolution, so the maps start
            at ``sigmoid(attn_init_bias)`` everywhere (0 -> 0.5, CycleGAN's zero-bias init).
        attn_coords: give the attention nets two coordinate channels (``y``, ``x`` in
            ``[-1, 1]``, CoordConv, Liu et al. 2018), so a map can depend on where a pixel is in
            the crop (re-ID crops centre the person).
        shared_attention: one attention net for both domains (``A_T is A_S``); eq. (5) then
            asks one net to give the same map before and after the translation.
        cycle_attention_grad: let the cycle loss (eq. 4) train the attention nets (as printed).
            ``False`` reconstructs through maps detached from the cycle term; the cycle loss
            still trains the encoders and generators. Measured: the cycle term is what keeps
            the person (docs/attention.md §8).
        reid_attention_grad: let the re-ID terms (eq. 6-8 on ``x_ST``) train the attention net
            ``A_S`` too (eq. 9 as printed). ``False`` stops their gradient at the map: the re-ID
            loss then still trains ``E_S``, ``G_S`` and the head through ``x_ST``, but cannot
            make the translation an identity map to pair ``x_ST`` with ``x_S`` more easily.
        cycle_through_attention: reconstruct through the full attention-guided mappings,
            ``x_STS = F(G(x_S))`` (default; Mejjati et al., and the form in which eq. (5)'s maps
            ``A_T(G(x_S))`` come for free), instead of eq. (4)'s literal generator-only chain
            ``G_T(E_T(G_S(E_S(x_S))))``.
        pixel_mean, pixel_std: the normalisation of the input images (the loaders use the
            ImageNet statistics). The generator's ``tanh`` output in ``[-1, 1]`` is mapped into
            the same normalised space, so the blend of eq. (1) mixes like with like.
    """

    image_size: tuple[int, int] = (256, 128)
    in_channels: int = 3
    gen_width: int = 64
    gen_downsamplings: int = 2
    gen_res_blocks: int = 9
    encoder_res_blocks: int | None = None
    attn_widths: tuple[int, int] = (32, 64)
    disc_width: int = 64
    disc_layers: int = 3
    num_ids: int = 751
    reid_bottleneck: int = 128
    embedding_dim: int = 128
    dropout: float = 0.5
    reid_stripes: int = 4
    no_attention: bool = False
    cycle_through_attention: bool = True
    attn_init_bias: float = 0.0
    attn_downsamplings: int = 2
    attn_coords: bool = False
    shared_attention: bool = False
    cycle_attention_grad: bool = True
    reid_attention_grad: bool = True
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        _check_fields(self)
        min_h, min_w = self.min_image_size
        h, w = self.image_size
        step = self.size_multiple
        if h < min_h or w < min_w:
            raise ValueError(
                f"ModelConfig: image_size {self.image_size} is too small for the networks: "
                f"the smallest allowed is {min_h}x{min_w} (H x W; "
                f"{'; '.join(self._size_reasons())})")
        if h % step or w % step:
            raise ValueError(
                f"ModelConfig: image_size {self.image_size} must be positive multiples of {step} "
                f"(2**gen_downsamplings={2 ** self.gen_downsamplings} and "
                f"2**attn_downsamplings={2 ** self.attn_downsamplings})")
        if not 0 <= self.encoder_blocks <= self.gen_res_blocks:
            raise ValueError(f"ModelConfig: encoder_res_blocks must be in [0, gen_res_blocks="
                             f"{self.gen_res_blocks}], got {self.encoder_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig: dropout must be in [0, 1), got {self.dropout}")
        if len(self.pixel_mean) != self.in_channels or len(self.pixel_std) != self.in_channels:
            raise ValueError(f"ModelConfig: pixel_mean/pixel_std need {self.in_channels} values, "
                             f"got {self.pixel_mean}, {self.pixel_std}")
        if any(s <= 0 for s in self.pixel_std):
            raise ValueError(f"ModelConfig: pixel_std must be > 0, got {self.pixel_std}")

    # ------------------------------------------------------------------ input size

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this: ``2 ** gen_downsamplings`` (the generator's
        transposed convs restore exactly the encoder's size) and ``2 ** attn_downsamplings``
        (the attention net's stride-2 stages and as many x2 upsamplings; 4 by default)."""
        return max(2 ** self.gen_downsamplings, 2 ** self.attn_downsamplings)

    def _size_needs(self) -> list[tuple[str, int, int]]:
        """``(reason, min H, min W)`` of every part of the networks."""
        down = 2 ** self.gen_downsamplings
        patch = 3 * 2 ** self.disc_layers
        needs = [
            (f"one PatchGAN score after {self.disc_layers} stride-2 convs: >= {patch}", patch,
             patch),
            (f"{self.reid_stripes} re-ID bands of one row at the encoder's stride {down}: "
             f"H >= {self.reid_stripes * down}", self.reid_stripes * down, 1),
            (f"a 2x2 encoder bottleneck: >= {2 * down}", 2 * down, 2 * down),
        ]
        if not self.no_attention:
            stride = 2 ** self.attn_downsamplings
            needs.append((f"the attention net's stride-{stride} residual block: >= {2 * stride}",
                          2 * stride, 2 * stride))
        return needs

    def _size_reasons(self) -> list[str]:
        return [reason for reason, _, _ in self._size_needs()]

    @property
    def min_image_size(self) -> tuple[int, int]:
        """The smallest ``(H, W)`` the networks take: every dimension a multiple of
        :attr:`size_multiple` and large enough for each network. The PatchGAN must produce at
        least one score (``floor(x / 2**disc_layers) - 2 >= 1``: 24 for the 70x70 PatchGAN,
        whose receptive field may exceed the image, as zero padding fills it), the encoder's
        bottleneck must be at least 2x2 (reflection padding and instance norm need 2 values per
        axis), the attention net's stride-4 residual block likewise (8 by default), and each of
        the re-ID head's ``reid_stripes`` bands at least one row of the bottleneck. 24x24 for both
        presets; a 256x128 or 64x32 person crop is far above it."""
        step = self.size_multiple

        def up(x: int) -> int:
            return -(-x // step) * step

        needs = self._size_needs()
        return up(max(h for _, h, _ in needs)), up(max(w for _, _, w in needs))

    @property
    def encoder_blocks(self) -> int:
        """Residual blocks in the encoder (``encoder_res_blocks`` resolved)."""
        if self.encoder_res_blocks is None:
            return (self.gen_res_blocks + 1) // 2
        return self.encoder_res_blocks

    @property
    def feature_dim(self) -> int:
        """Channels of the encoder output (the re-ID feature): ``gen_width * 2**downsamplings``."""
        return self.gen_width * 2 ** self.gen_downsamplings

    @property
    def reid_feature_dim(self) -> int:
        """Width of the re-ID feature vector: ``feature_dim * reid_stripes``."""
        return self.feature_dim * self.reid_stripes

    def replace(self, **overrides) -> "ModelConfig":
        """A copy with ``overrides`` applied (validated again)."""
        return dataclasses.replace(self, **overrides)


def _check_fields(config: "ModelConfig") -> None:
    """Types and ranges of every field (a config comes from YAML files and checkpoints too);
    sequences become tuples."""
    def fail(name: str, expected: str, value) -> None:
        raise ValueError(f"ModelConfig: {name} must be {expected}; got {value!r}")

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    for name in ("image_size", "attn_widths", "pixel_mean", "pixel_std"):
        value = getattr(config, name)
        if isinstance(value, list):
            object.__setattr__(config, name, tuple(value))
    for name, low in (("in_channels", 1), ("gen_width", 1), ("gen_downsamplings", 0),
                      ("gen_res_blocks", 0), ("disc_width", 1), ("disc_layers", 1),
                      ("num_ids", 1), ("reid_bottleneck", 1), ("embedding_dim", 1),
                      ("reid_stripes", 1), ("attn_downsamplings", 2)):
        value = getattr(config, name)
        if not integer(value) or value < low:
            fail(name, f"an integer >= {low}", value)
    if config.encoder_res_blocks is not None and not integer(config.encoder_res_blocks):
        fail("encoder_res_blocks", "an integer or null", config.encoder_res_blocks)
    for name in ("image_size", "attn_widths"):
        value = getattr(config, name)
        if (not isinstance(value, tuple) or len(value) != 2
                or not all(integer(v) and v >= 1 for v in value)):
            fail(name, "two integers >= 1", value)
    if not number(config.dropout):
        fail("dropout", "a number in [0, 1)", config.dropout)
    if not number(config.attn_init_bias) or not abs(config.attn_init_bias) < float("inf"):
        fail("attn_init_bias", "a finite number", config.attn_init_bias)
    for name in ("no_attention", "cycle_through_attention", "reid_attention_grad",
                 "attn_coords", "shared_attention", "cycle_attention_grad"):
        if not isinstance(getattr(config, name), bool):
            fail(name, "true or false", getattr(config, name))
    for name in ("pixel_mean", "pixel_std"):
        value = getattr(config, name)
        if not isinstance(value, tuple) or not all(number(v) for v in value):
            fail(name, f"{config.in_channels} numbers", value)


MODEL_PRESETS: dict[str, ModelConfig] = {
    "paper": ModelConfig(),
    "tiny": ModelConfig(image_size=(64, 32), gen_width=16, gen_res_blocks=2, attn_widths=(16, 32),
                        disc_width=16, num_ids=60, reid_bottleneck=64, embedding_dim=64),
}


def model_config(preset: str = "paper", **overrides) -> ModelConfig:
    """The named preset (``paper`` or ``tiny``) with ``overrides`` applied.

    Raises:
        ValueError: for an unknown preset, listing the choices.
    """
    try:
        base = MODEL_PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown model preset {preset!r}; choices: "
                         f"{', '.join(sorted(MODEL_PRESETS))}") from None
    return base.replace(**overrides) if overrides else base
