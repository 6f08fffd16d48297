"""The EDAAN objective (eq. 3-9): each term against its formula, and the weighted total."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edaan_fast.losses import (
    EDAANObjective,
    LossWeights,
    attention_area_loss,
    attention_consistency_loss,
    cycle_loss,
    discriminator_input,
    id_loss,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
)
from edaan_fast.models import build_model
from tests.oracles import BatchHardTriplet


class Recorder(nn.Module):
    """Records what the metric loss is called with and returns a known value."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, emb, labels):
        self.calls.append((emb.detach().clone(), labels.clone()))
        return emb.sum() * 0 + 0.25


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_lsgan_terms_match_their_formulas():
    real, fake = rand(3, 1, 6, 2, seed=1), rand(3, 1, 6, 2, seed=2)
    assert torch.allclose(lsgan_generator_loss(fake), ((fake - 1) ** 2).mean().float())
    expected = 0.5 * (((real - 1) ** 2).mean() + (fake ** 2).mean())
    assert torch.allclose(lsgan_discriminator_loss(real, fake), expected.float())
    assert lsgan_generator_loss(torch.ones(2, 1, 3, 3)).item() == 0.0
    assert lsgan_discriminator_loss(torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)).item() == 0.0
    assert lsgan_generator_loss(fake.bfloat16()).dtype == torch.float32


def test_cycle_and_attention_terms_match_their_formulas():
    xs, rs, xt, rt = (rand(2, 3, 8, 4, seed=s) for s in range(4))
    expected = (rs - xs).abs().mean() + (rt - xt).abs().mean()
    assert torch.allclose(cycle_loss(xs, rs, xt, rt), expected.float())
    a_s, a_t_st, a_t, a_s_ts = (rand(2, 1, 8, 4, seed=s).sigmoid() for s in range(4, 8))
    expected = (a_s - a_t_st).abs().mean() + (a_t - a_s_ts).abs().mean()
    assert torch.allclose(attention_consistency_loss(a_s, a_t_st, a_t, a_s_ts), expected.float())


@pytest.mark.parametrize("mode, learners", [
    ("symmetric", {"a_s", "a_t_st", "a_t", "a_s_ts"}),
    ("real-target", {"a_t_st", "a_s_ts"}),
    ("translated-target", {"a_s", "a_t"}),
    ("source-teacher", {"a_t_st", "a_t"}),
])
def test_attention_consistency_modes_route_gradients_to_the_learning_side(mode, learners):
    maps = {k: rand(2, 1, 8, 4, seed=20 + i).float().sigmoid().requires_grad_()
            for i, k in enumerate(("a_s", "a_t_st", "a_t", "a_s_ts"))}
    loss = attention_consistency_loss(maps["a_s"], maps["a_t_st"], maps["a_t"], maps["a_s_ts"],
                                      mode)
    expected = ((maps["a_s"] - maps["a_t_st"]).abs().mean()
                + (maps["a_t"] - maps["a_s_ts"]).abs().mean())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # the value never changes
    loss.backward()
    got = {k for k, v in maps.items() if v.grad is not None and v.grad.abs().sum() > 0}
    assert got == learners
    with pytest.raises(ValueError, match="mode must be one of"):
        attention_consistency_loss(*maps.values(), mode="both")


def test_id_loss_is_cross_entropy():
    logits, labels = rand(6, 5, seed=9), torch.tensor([0, 1, 4, 4, 2, 3])
    expected = -torch.log_softmax(logits, 1)[torch.arange(6), labels].mean()
    assert torch.allclose(id_loss(logits, labels), expected.float())
    assert id_loss(logits, labels, 0.1) > id_loss(logits * 0 + logits, labels) - 10  # runs
    assert not torch.allclose(id_loss(logits, labels, 0.1), id_loss(logits, labels))


def test_discriminator_input_masks_the_foreground_without_gradient_to_the_mask():
    x = rand(2, 3, 8, 4, seed=10).float().requires_grad_()
    mask = rand(2, 1, 8, 4, seed=11).float().sigmoid().requires_grad_()
    assert discriminator_input(x, mask, masked=False) is x
    assert discriminator_input(x, None, masked=True) is x
    out = discriminator_input(x, mask, masked=True)
    torch.testing.assert_close(out, (1 - mask) * x)
    out.sum().backward()
    assert mask.grad is None
    torch.testing.assert_close(x.grad, (1 - mask).detach().expand_as(x))


def test_binarised_discriminator_mask_keeps_pixels_changed_by_more_than_tau():
    x = rand(2, 3, 8, 4, seed=12).float()
    mask = torch.linspace(0, 1, 2 * 8 * 4).reshape(2, 1, 8, 4).requires_grad_()
    out = discriminator_input(x, mask, masked=True, threshold=0.1)
    background = (1 - mask.detach()) > 0.1  # translated by more than tau: seen, unscaled
    torch.testing.assert_close(out, torch.where(background, x, torch.zeros_like(x)))
    assert 0 < background.sum() < background.numel()
    assert discriminator_input(x, mask, masked=False, threshold=0.1) is x


def test_objective_binary_mask_reaches_the_generators_adversarial_terms(model_and_batch):
    model, x_s, x_t, labels = model_and_batch
    with torch.no_grad():
        out = model(x_s, x_t)
        soft = EDAANObjective(None).generator_losses(model, out, x_s, x_t, labels, True)
        hard = EDAANObjective(None, binary_mask=0.1).generator_losses(model, out, x_s, x_t,
                                                                      labels, True)
        first = EDAANObjective(None, binary_mask=0.1).generator_losses(model, out, x_s, x_t,
                                                                       labels, False)
    assert abs(hard.gan_s2t.item() - soft.gan_s2t.item()) > 1e-6
    assert hard.cycle.item() == soft.cycle.item()
    unmasked = EDAANObjective(None).generator_losses(model, out, x_s, x_t, labels, False)
    assert first.gan_s2t.item() == unmasked.gan_s2t.item()  # the first phase is unchanged


def test_loss_weights_defaults_and_validation():
    w = LossWeights()
    assert (w.attention, w.metric, w.id, w.cycle, w.gan) == (10.0, 1.0, 1.0, 10.0, 1.0)
    with pytest.raises(ValueError, match="LossWeights.cycle must be a non-negative number"):
        LossWeights(cycle=-1)


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = build_model("tiny", num_ids=4)
    g = torch.Generator().manual_seed(0)
    x_s = torch.randn(4, 3, 64, 32, generator=g)
    x_t = torch.randn(4, 3, 64, 32, generator=g)
    labels = torch.tensor([0, 0, 3, 3])
    return model, x_s, x_t, labels


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("weights", [LossWeights(), LossWeights(gan=0.5, cycle=3.0, attention=2.0,
                                                                metric=0.7, id=1.5,
                                                                attention_tv=0.4,
                                                                attention_area=0.6,
                                                                area_budget=0.2,
                                                                mask_guidance=0.8)])
def test_total_is_the_weighted_sum_of_the_logged_terms(model_and_batch, weights, masked):
    """``masked``: the phase after the switch, with refinement and a mask-guidance pair."""
    model, x_s, x_t, labels = model_and_batch
    objective = EDAANObjective(BatchHardTriplet(), weights)
    with torch.no_grad():
        out = model(x_s, x_t)
        pairs = ((out.t2s.attention, (x_t[:, :1] > 0).float()),) if masked else ()
        g = objective.generator_losses(model, out, x_s, x_t, labels, masked,
                                       refine_target_attention=masked, guide_pairs=pairs)
    t = {k: v.item() for k, v in g.terms().items()}
    assert all(v > 0 for k, v in t.items()
               if k != "metric" and (masked or k not in ("refine", "guide")))
    assert masked or t["refine"] == t["guide"] == 0.0
    expected = (weights.gan * (t["gan_s2t"] + t["gan_t2s"]) + weights.cycle * t["cycle"]
                + weights.attention * (t["attention"] + t["refine"])
                + weights.attention_tv * t["smoothness"] + weights.attention_area * t["area"]
                + weights.metric * t["metric"] + weights.id * t["id"]
                + weights.mask_guidance * t["guide"])
    assert t["total"] == pytest.approx(expected, rel=1e-6)


def test_generator_terms_follow_the_paper_pairing(model_and_batch):
    model, x_s, x_t, labels = model_and_batch
    objective = EDAANObjective(None)
    with torch.no_grad():
        out = model(x_s, x_t)
        g = objective.generator_losses(model, out, x_s, x_t, labels, masked_discriminator=False)
        # D_T scores the S -> T translation, D_S the T -> S one (eq. 3).
        assert g.gan_s2t.item() == pytest.approx(
            ((model.discriminator_T(out.s2t.image) - 1) ** 2).mean().item(), rel=1e-6)
        assert g.gan_t2s.item() == pytest.approx(
            ((model.discriminator_S(out.t2s.image) - 1) ** 2).mean().item(), rel=1e-6)
        gm = objective.generator_losses(model, out, x_s, x_t, labels, masked_discriminator=True)
        bg = (1 - out.s2t.attention) * out.s2t.image
        assert gm.gan_s2t.item() == pytest.approx(
            ((model.discriminator_T(bg) - 1) ** 2).mean().item(), rel=1e-5)
    assert g.cycle.item() == pytest.approx(cycle_loss(x_s, out.rec_S, x_t, out.rec_T).item())
    assert g.metric.item() == 0.0  # no metric loss module given
    # L_id over the real images and their translations, both with the source labels.
    assert g.id.item() == pytest.approx(
        F.cross_entropy(out.reid.logits, torch.cat([labels, labels])).item(), rel=1e-6)


def test_metric_loss_sees_real_and_translated_source_with_source_labels(model_and_batch):
    model, x_s, x_t, labels = model_and_batch
    rec = Recorder()
    with torch.no_grad():
        out = model(x_s, x_t)
        g = EDAANObjective(rec, LossWeights(metric=2.0)).generator_losses(
            model, out, x_s, x_t, labels, False)
    (emb, lab), = rec.calls
    assert emb.shape == (8, model.config.embedding_dim)
    assert lab.tolist() == [0, 0, 3, 3, 0, 0, 3, 3]
    torch.testing.assert_close(emb[4:], model.reid(out.s2t.image).embedding)
    assert g.metric.item() == pytest.approx(0.25)


def test_no_attention_model_has_zero_attention_term():
    torch.manual_seed(0)
    model = build_model("tiny", no_attention=True, num_ids=2)
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        g = EDAANObjective(None).generator_losses(model, model(x, x), x, x,
                                                  torch.tensor([0, 1]), True)
    assert g.attention.item() == 0.0 and g.cycle.item() > 0


def test_discriminator_losses_pair_each_discriminator_with_its_domain(model_and_batch):
    model, x_s, x_t, _ = model_and_batch
    with torch.no_grad():
        out = model(x_s, x_t, with_reid=False)
        d = EDAANObjective().discriminator_losses(model, x_s, x_t, out.s2t.image, out.t2s.image)
        d_t = lsgan_discriminator_loss(model.discriminator_T(x_t),
                                       model.discriminator_T(out.s2t.image))
        d_s = lsgan_discriminator_loss(model.discriminator_S(x_s),
                                       model.discriminator_S(out.t2s.image))
    assert d.d_T.item() == pytest.approx(d_t.item(), rel=1e-6)
    assert d.d_S.item() == pytest.approx(d_s.item(), rel=1e-6)
    assert d.total.item() == pytest.approx(d_s.item() + d_t.item(), rel=1e-6)


def test_attention_area_loss_by_hand():
    """Two images keeping 0.8 and 0.3 of their pixels: with budget 0.5 only the first pays,
    (0.8 - 0.5) / 2 images = 0.15 per map; with budget 0 the plain mean, (0.8 + 0.3) / 2; the
    gradient reaches only the image over budget, 1 / (2 images x 4 pixels) per pixel."""
    a = torch.tensor([0.8, 0.3]).view(2, 1, 1, 1).expand(2, 1, 2, 2).clone().requires_grad_()
    loss = attention_area_loss(a, a, budget=0.5)  # two maps: summed
    assert loss.item() == pytest.approx(2 * 0.15, abs=1e-6)
    loss.backward()
    assert torch.allclose(a.grad[0], torch.full((1, 2, 2), 2 / 8))
    assert torch.equal(a.grad[1], torch.zeros(1, 2, 2))
    assert attention_area_loss(a.detach(), budget=0.0).item() == pytest.approx(0.55, abs=1e-6)
