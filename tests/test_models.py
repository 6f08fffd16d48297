"""EDAAN networks: shapes for both presets, mask range, the blend of eq. (1)/(2), switches."""

from __future__ import annotations

import pytest
import torch

import edaan_fast
from edaan_fast.models import (
    EDAAN,
    MODEL_PRESETS,
    AttentionNet,
    ModelConfig,
    PatchDiscriminator,
    build_model,
    model_config,
    receptive_field,
    set_requires_grad,
)
from edaan_fast.ops import use_reference_ops

OPS_MODES = [pytest.param(False, marks=pytest.mark.skipif(not edaan_fast.has_ops(),
                                                          reason="compiled ops not built"),
                          id="fused"),
             pytest.param(True, id="reference")]


def images(n: int, cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.in_channels, *cfg.image_size, generator=g)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny")


def force_attention(net: AttentionNet, value: float) -> None:
    """Makes ``net`` output exactly ``value`` (0 or 1) everywhere: zero head weights, huge bias."""
    conv = net.head[-1]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(200.0 if value == 1 else -200.0)


def test_tiny_shapes_and_mask_range(tiny):
    cfg = tiny.config
    x_s, x_t = images(4, cfg, 1), images(3, cfg, 2)
    with torch.no_grad():
        out = tiny(x_s, x_t)
    h, w = cfg.image_size
    assert out.s2t.image.shape == (4, 3, h, w) and out.t2s.image.shape == (3, 3, h, w)
    assert out.s2t.generated.shape == (4, 3, h, w)
    assert out.rec_S.shape == x_s.shape and out.rec_T.shape == x_t.shape
    assert out.s2t.features.shape == (4, cfg.feature_dim, h // 4, w // 4)
    for a, n in [(out.s2t.attention, 4), (out.t2s.attention, 3), (out.attention_T_of_ST, 4),
                 (out.attention_S_of_TS, 3)]:
        assert a.shape == (n, 1, h, w)
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
        assert float(a.std()) > 0.0  # not a constant map
    assert out.reid.logits.shape == (8, cfg.num_ids)
    assert out.reid.embedding.shape == (8, cfg.embedding_dim)
    assert out.reid.feature.shape == (8, cfg.reid_feature_dim)


def test_paper_preset_shapes_batch1():
    torch.manual_seed(0)
    model = build_model("paper").eval()
    cfg = model.config
    assert cfg.image_size == (256, 128) and cfg.gen_res_blocks == 9 and cfg.gen_width == 64
    assert len(model.encoder_S.body) - 3 == cfg.encoder_blocks == 5  # stem + 2 downsamplings
    x = images(1, cfg)
    with torch.no_grad():
        t = model.s2t(x)
        assert t.features.shape == (1, 256, 64, 32)
        assert t.image.shape == (1, 3, 256, 128) and t.attention.shape == (1, 1, 256, 128)
        assert float(t.attention.min()) >= 0.0 and float(t.attention.max()) <= 1.0
        assert model.discriminator_T(t.image).shape == (1, 1, 30, 14)
        assert model.extract_features(x).shape == (1, 128)
        assert model.reid(x).logits.shape == (1, 751)


def test_patchgan_receptive_field_is_70():
    assert receptive_field(3) == 70
    d = PatchDiscriminator(3, 8, 3)
    widths = [m.out_channels for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [8, 16, 32, 64, 1]


def test_generator_output_stays_in_the_image_range(tiny):
    cfg = tiny.config
    with torch.no_grad():
        out = tiny.generator_S(tiny.encoder_S(images(2, cfg) * 10))
    mean = torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.pixel_std).view(1, 3, 1, 1)
    pixels = out * std + mean
    assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5


@pytest.mark.parametrize("reference", OPS_MODES)
def test_attention_one_keeps_the_input_and_zero_gives_the_generator(reference):
    torch.manual_seed(1)
    model = build_model("tiny")
    x = images(2, model.config, 3)
    ctx = use_reference_ops() if reference else use_reference_ops(False)
    with torch.no_grad(), ctx:
        force_attention(model.attention_S, 1)
        force_attention(model.attention_T, 1)
        t = model.s2t(x)
        assert torch.equal(t.attention, torch.ones_like(t.attention))
        assert torch.equal(t.image, x)
        assert torch.equal(model.translate_t2s(x), x)
        assert not torch.equal(t.generated, x)
        force_attention(model.attention_S, 0)
        t = model.s2t(x)
        assert torch.equal(t.attention, torch.zeros_like(t.attention))
        assert torch.equal(t.image, model.generator_S(model.encoder_S(x)))


def test_blend_matches_equation_1(tiny):
    x = images(2, tiny.config, 4)
    with torch.no_grad():
        t = tiny.s2t(x)
        a = tiny.attention_S(x)
        expected = a * x + (1 - a) * tiny.generator_S(tiny.encoder_S(x))
    torch.testing.assert_close(t.image, expected, atol=1e-6, rtol=1e-6)


def test_cycle_reconstruction_runs_the_other_direction(tiny):
    x_s, x_t = images(2, tiny.config, 5), images(2, tiny.config, 6)
    with torch.no_grad():
        out = tiny(x_s, x_t, with_reid=False)
        x_st = out.s2t.image
        torch.testing.assert_close(out.rec_S, tiny.translate_t2s(x_st))
        torch.testing.assert_close(out.attention_T_of_ST, tiny.attention_T(x_st))
        torch.testing.assert_close(out.rec_T, tiny.translate_s2t(out.t2s.image))
    assert out.reid is None


def test_literal_eq4_cycle_uses_generators_only():
    torch.manual_seed(2)
    model = build_model("tiny", cycle_through_attention=False)
    x_s, x_t = images(2, model.config, 7), images(2, model.config, 8)
    with torch.no_grad():
        out = model(x_s, x_t, with_reid=False)
        rec = model.generator_T(model.encoder_T(model.generator_S(model.encoder_S(x_s))))
        torch.testing.assert_close(out.rec_S, rec)
        torch.testing.assert_close(out.attention_T_of_ST, model.attention_T(out.s2t.image))


def test_no_attention_is_the_plain_generator():
    torch.manual_seed(3)
    model = build_model("tiny", no_attention=True)
    assert model.attention_S is None and model.attention_nets() == []
    assert not any("attention" in name for name, _ in model.named_parameters())
    x_s, x_t = images(2, model.config, 9), images(2, model.config, 10)
    with torch.no_grad():
        out = model(x_s, x_t)
        torch.testing.assert_close(out.s2t.image, model.generator_S(model.encoder_S(x_s)))
        rec = model.generator_T(model.encoder_T(out.s2t.image))
    torch.testing.assert_close(out.rec_S, rec)
    assert out.s2t.attention is None and out.attention_T_of_ST is None


def test_parameter_groups_partition_the_model(tiny):
    g = {id(p) for p in tiny.generator_parameters()}
    d = {id(p) for p in tiny.discriminator_parameters()}
    every = {id(p) for p in tiny.parameters()}
    assert g and d and not g & d and g | d == every


def test_set_requires_grad_skips_none_and_toggles(tiny):
    set_requires_grad([tiny.discriminator_S, None], False)
    assert not any(p.requires_grad for p in tiny.discriminator_S.parameters())
    assert all(p.requires_grad for p in tiny.discriminator_T.parameters())
    set_requires_grad(tiny.discriminator_S, True)
    assert all(p.requires_grad for p in tiny.discriminator_S.parameters())


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'; choices: paper, tiny"):
        model_config("huge")
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("huge")


def test_config_validation_and_overrides():
    with pytest.raises(ValueError, match=r"image_size \(250, 128\) must be positive multiples of 4"):
        ModelConfig(image_size=(250, 128))
    with pytest.raises(ValueError, match="encoder_res_blocks must be in"):
        ModelConfig(encoder_res_blocks=10)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.0)
    cfg = model_config("tiny", num_ids=7)
    assert cfg.num_ids == 7 and MODEL_PRESETS["tiny"].num_ids == 60
    assert EDAAN(cfg).reid_head.classifier[-1].out_features == 7
    assert model_config("paper").encoder_blocks == 5
    assert model_config("paper", encoder_res_blocks=9).encoder_blocks == 9


def test_reid_head_order_and_dropout(tiny):
    kinds = [type(m).__name__ for m in tiny.reid_head.classifier]
    assert kinds == ["Linear", "BatchNorm1d", "Dropout", "ReLU", "Linear"]
    assert tiny.reid_head.classifier[2].p == 0.5
    assert tiny.reid_head.classifier[0].out_features == tiny.config.reid_bottleneck


def test_attention_options_shapes_and_size_rules():
    x = torch.randn(2, 3, 64, 32)
    for overrides in ({"attn_downsamplings": 3}, {"attn_coords": True},
                      {"shared_attention": True}, {"cycle_attention_grad": False}):
        model = build_model("tiny", **overrides)
        out = model(x, x)
        assert out.s2t.attention.shape == (2, 1, 64, 32)
        assert out.attention_T_of_ST.shape == (2, 1, 64, 32)
    cfg = model_config("tiny", attn_downsamplings=3)
    assert cfg.size_multiple == 8 and cfg.min_image_size == (24, 24)
    assert model_config("tiny", attn_downsamplings=4).min_image_size == (32, 32)
    with pytest.raises(ValueError, match=r"multiples of 8 .*2\*\*attn_downsamplings=8"):
        model_config("tiny", attn_downsamplings=3, image_size=(60, 36))
    with pytest.raises(ValueError, match="attn_downsamplings must be an integer >= 2"):
        model_config("tiny", attn_downsamplings=1)
    with pytest.raises(ValueError, match="shared_attention must be true or false"):
        model_config("tiny", shared_attention=1)


def test_deeper_attention_net_sees_further():
    """One more stride-2 stage widens the convolutions' field (about +-19 -> +-35 pixels):
    a pixel 26 rows below the scored one reaches the score only then. Instance norm, which
    mixes in every pixel through its statistics, is taken out to see the field itself."""
    torch.manual_seed(0)
    for downsamplings, far_changes in ((2, False), (3, True)):
        net = build_model("tiny", attn_downsamplings=downsamplings).attention_S.eval()
        for module in list(net.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.InstanceNorm2d):
                    setattr(module, name, torch.nn.Identity())
        x = torch.randn(1, 3, 64, 32, requires_grad=True)
        net.logits(x)[0, 0, 4, 16].backward()
        reach = x.grad.abs().sum(dim=(0, 1)) > 0
        assert bool(reach[20].any())
        assert bool(reach[30:].any()) is far_changes


def test_coordinate_channels_let_the_map_depend_on_position():
    from edaan_fast.models.attention import coordinate_channels

    c = coordinate_channels(torch.zeros(2, 3, 4, 3))
    torch.testing.assert_close(c[1, 0, :, 0], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    torch.testing.assert_close(c[0, 1, 0], torch.tensor([-1.0, 0.0, 1.0]))
    flat = torch.zeros(1, 3, 64, 32)  # a constant image: only the coordinates vary
    plain = build_model("tiny").attention_S(flat)
    coords = build_model("tiny", attn_coords=True).attention_S(flat)
    assert plain[..., 8:-8, 8:-8].std() < 1e-5 < coords[..., 8:-8, 8:-8].std()


def test_shared_attention_is_one_net_in_every_group():
    model = build_model("tiny", shared_attention=True)
    assert model.attention_T is model.attention_S
    assert model.attention_nets() == [model.attention_S]
    ids = [id(p) for p in model.generator_parameters()]
    assert len(ids) == len(set(ids))
    state = model.state_dict()
    twin = build_model("tiny", shared_attention=True)
    twin.load_state_dict(state)
    torch.testing.assert_close(twin.attention_T.head[1].weight, model.attention_S.head[1].weight)


def test_cycle_attention_grad_off_keeps_the_cycle_away_from_the_maps():
    torch.manual_seed(0)
    x_s, x_t = torch.randn(2, 3, 64, 32), torch.randn(2, 3, 64, 32)
    grads = {}
    for flag in (True, False):
        torch.manual_seed(1)
        model = build_model("tiny", cycle_attention_grad=flag)
        out = model(x_s, x_t, with_reid=False)
        ((out.rec_S - x_s).abs().mean() + (out.rec_T - x_t).abs().mean()).backward()
        grads[flag] = [sum(p.grad.abs().sum() for p in net.parameters() if p.grad is not None)
                       for net in model.attention_nets()]
        assert sum(p.grad.abs().sum() for p in model.generator_T.parameters()) > 0
        reference = out
    assert all(g > 0 for g in grads[True]) and all(g == 0 for g in grads[False])
    # the values do not change, only where the gradient goes
    torch.manual_seed(1)
    same = build_model("tiny")(x_s, x_t, with_reid=False)
    torch.testing.assert_close(reference.rec_S, same.rec_S)
    torch.testing.assert_close(reference.attention_T_of_ST, same.attention_T_of_ST)
