"""The EDAAN training step: which modules learn in each phase, AMP, the non-finite rule, the
image pools, and a short training run on the embedded synthetic data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from edaan_fast.engine import EDAANTrainStep, ImagePool, NonFiniteLossError, Phase
from edaan_fast.losses import EDAANObjective
from edaan_fast.models import build_model
from tests.oracles import BatchHardTriplet

PHASES = [pytest.param(Phase(True, False), id="attention-whole"),
          pytest.param(Phase(False, True), id="frozen-masked")]


class SpyAdam(torch.optim.Adam):
    """Adam that records, when it steps, which parameters of ``model`` hold a non-zero grad."""

    def __init__(self, params, model: nn.Module):
        super().__init__(params, lr=1e-3, betas=(0.5, 0.999))
        self.model = model
        self.with_grad: set[str] | None = None

    def step(self, closure=None):
        self.with_grad = {n for n, p in self.model.named_parameters()
                          if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        return super().step(closure)


def make(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = build_model("tiny", num_ids=4, **overrides)
    return model, EDAANObjective(BatchHardTriplet())


def batch(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    x_s = torch.randn(n, 3, 64, 32, generator=g)
    x_t = torch.randn(n, 3, 64, 32, generator=g)
    labels = torch.arange(n) // 2
    return x_s, labels, x_t


def names(model, prefixes):
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("phase", PHASES)
def test_gradients_reach_every_learner_and_no_frozen_module(phase):
    model, objective = make()
    opt_g = SpyAdam(model.generator_parameters(), model)
    opt_d = SpyAdam(model.discriminator_parameters(), model)
    step = EDAANTrainStep(model, objective)
    before = snapshot(model)
    log = step(*batch(), optimizer_G=opt_g, optimizer_D=opt_d, phase=phase)

    disc = names(model, ("discriminator_",))
    attn = names(model, ("attention_",))
    learners = names(model, ("encoder_", "generator_", "reid_head"))
    if phase.train_attention:
        learners |= attn
    assert opt_g.with_grad == learners          # nothing frozen, no discriminator
    assert opt_d.with_grad >= disc              # the D step reaches both discriminators
    assert changed(before, model) == learners | disc
    if not phase.train_attention:
        assert all(not p.requires_grad for p in model.attention_S.parameters())
    assert all(p.requires_grad for p in model.discriminator_T.parameters())
    assert log["skipped_G"] == 0.0 and log["skipped_D"] == 0.0
    assert set(log) == {"gan_s2t", "gan_t2s", "cycle", "attention", "smoothness", "area",
                        "metric", "id", "refine", "guide", "total",
                        "d_S", "d_T", "d_total", "skipped_G", "skipped_D"}


def test_refinement_trains_only_the_target_attention_net_from_its_own_term():
    """After the switch with ``refine``: A_S stays frozen; A_T changes, and its gradient is
    exactly that of ``λ_attn mean|A_T(x_ST) - A_S(x_S)|`` with the right side fixed."""
    model, objective = make()
    x_s, labels, x_t = batch()
    with torch.no_grad():
        x_st, a_s = model.s2t(x_s).image, model.attention_S(x_s)
    twin = copy.deepcopy(model.attention_T)
    expected = torch.autograd.grad(
        objective.weights.attention * (twin(x_st) - a_s).abs().mean(), list(twin.parameters()))
    opt_g = SpyAdam(model.generator_parameters(), model)
    opt_d = SpyAdam(model.discriminator_parameters(), model)
    before = snapshot(model)
    log = EDAANTrainStep(model, objective)(x_s, labels, x_t, opt_g, opt_d,
                                            Phase(False, True, refine_target_attention=True))
    learners = names(model, ("encoder_", "generator_", "reid_head", "attention_T"))
    assert opt_g.with_grad == learners
    assert changed(before, model) == learners | names(model, ("discriminator_",))
    for got, want in zip((p.grad for p in model.attention_T.parameters()), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    assert log["refine"] == pytest.approx((twin(x_st) - a_s).abs().mean().item(), rel=1e-5)
    assert Phase.for_epoch(3, 4, 4, refine=True) == Phase(True, False, False)
    assert Phase.for_epoch(4, 4, 4, refine=True) == Phase(False, True, True)


def test_no_attention_model_trains_without_attention_terms():
    model, objective = make(no_attention=True)
    step = EDAANTrainStep(model, objective)
    opt_g = torch.optim.Adam(model.generator_parameters(), 1e-3)
    opt_d = torch.optim.Adam(model.discriminator_parameters(), 1e-3)
    before = snapshot(model)
    log = step(*batch(), opt_g, opt_d, Phase(True, True))
    assert log["attention"] == 0.0
    assert changed(before, model) == {n for n, _ in model.named_parameters()}


def test_logged_total_is_the_weighted_sum():
    model, objective = make()
    step = EDAANTrainStep(model, objective)
    log = step(*batch(), torch.optim.Adam(model.generator_parameters()),
               torch.optim.Adam(model.discriminator_parameters()))
    w = objective.weights
    expected = (w.gan * (log["gan_s2t"] + log["gan_t2s"]) + w.cycle * log["cycle"]
                + w.attention * log["attention"] + w.metric * log["metric"] + w.id * log["id"])
    assert log["total"] == pytest.approx(expected, rel=1e-6)
    assert log["d_total"] == pytest.approx(log["d_S"] + log["d_T"], rel=1e-6)


#: Relative gap allowed between a bf16-autocast and a float32 loss term on the same weights,
#: inputs and dropout masks. bf16 keeps 8 significant bits (unit roundoff 2**-8 = 3.9e-3).
#: Measured on this test's batch (AMD EPYC with AVX512-BF16, one and two threads): 6.2e-5 (d_S) to
#: 3.0e-3 (metric); the largest over the seeds 0-9 of the model and batch: 5.4e-3 (gan_t2s),
#: 5.2e-3 (metric), 3.1e-3 (gan_s2t), 2.9e-3 (d_S), 1.9e-3 (id).
BF16_REL = 1.5e-2


def test_bf16_autocast_step_is_finite_and_updates_the_same_parameters_as_fp32():
    model32, objective = make()
    model16 = copy.deepcopy(model32)
    logs, updated = {}, {}
    for name, model, amp in [("fp32", model32, False), ("bf16", model16, True)]:
        step = EDAANTrainStep(model, objective, amp=amp)
        before = snapshot(model)
        torch.manual_seed(1)  # the same dropout masks in both steps
        logs[name] = step(*batch(), torch.optim.Adam(model.generator_parameters(), 1e-3),
                          torch.optim.Adam(model.discriminator_parameters(), 1e-3))
        updated[name] = changed(before, model)
        assert all(np.isfinite(v) for v in logs[name].values())
    assert updated["bf16"] == updated["fp32"] == {n for n, _ in model32.named_parameters()}
    for term in ("cycle", "id", "gan_s2t", "gan_t2s", "attention", "metric", "total", "d_S",
                 "d_T"):
        assert logs["bf16"][term] == pytest.approx(logs["fp32"][term], rel=BF16_REL), term
    # the weights did not come out in bf16
    assert all(p.dtype == torch.float32 for p in model16.parameters())


def test_fp16_scaler_overflow_skips_the_step_without_raising():
    model, objective = make()
    step = EDAANTrainStep(model, objective, amp=True, amp_dtype=torch.float16,
                          init_scale=2.0 ** 120)
    before = snapshot(model)
    log = step(*batch(), torch.optim.Adam(model.generator_parameters(), 1e-3),
               torch.optim.Adam(model.discriminator_parameters(), 1e-3))
    assert log["skipped_G"] == 1.0 and log["skipped_D"] == 1.0
    assert changed(before, model) == set()
    assert step.scaler_G.get_scale() < 2.0 ** 120 and step.scaler_G is not step.scaler_D
    assert np.isfinite(log["total"])


class InfLoss(nn.Module):
    def forward(self, emb, labels):
        return emb.sum() * 0 + float("inf")


def test_non_finite_loss_raises_naming_step_and_term_before_any_update():
    model, _ = make()
    step = EDAANTrainStep(model, EDAANObjective(InfLoss()))
    step.num_steps = 41
    before = snapshot(model)
    with pytest.raises(NonFiniteLossError,
                       match=r"non-finite generator loss at training step 41: metric = inf"):
        step(*batch(), torch.optim.Adam(model.generator_parameters()),
             torch.optim.Adam(model.discriminator_parameters()))
    assert changed(before, model) == set()


def test_phase_schedule():
    assert Phase.for_epoch(0) == Phase(True, False)
    assert Phase.for_epoch(29) == Phase(True, False)
    assert Phase.for_epoch(30) == Phase(False, True)
    assert Phase.for_epoch(5, attention_epochs=3, whole_image_epochs=10) == Phase(False, False)


def test_image_pool_fills_then_mixes_and_resumes_exactly():
    pool = ImagePool(5, seed=3)
    first = torch.randn(5, 2, 4, 4)
    assert torch.equal(pool.query(first), first) and len(pool) == 5
    state = copy.deepcopy(pool.state_dict())
    new = [torch.randn(3, 2, 4, 4) for _ in range(4)]
    outs = [pool.query(b) for b in new]
    assert len(pool) == 5
    assert any(not torch.equal(o, b) for o, b in zip(outs, new))  # some came from the pool
    resumed = ImagePool(5)
    resumed.load_state_dict(state)
    for b, o in zip(new, outs):
        assert torch.equal(resumed.query(b), o)
    assert torch.equal(ImagePool(0).query(first), first)
    with pytest.raises(ValueError, match="pool_size must be >= 0"):
        ImagePool(-1)


def test_step_state_dict_restores_the_pools():
    model, objective = make()
    step = EDAANTrainStep(model, objective, pool_size=6)
    opts = (torch.optim.Adam(model.generator_parameters()),
            torch.optim.Adam(model.discriminator_parameters()))
    step(*batch(1), *opts)
    state = copy.deepcopy(step.state_dict())
    assert state["pool_T"]["images"].shape == (4, 4, 64, 32)  # image + mask channel
    fresh = EDAANTrainStep(model, objective, pool_size=6)
    fresh.load_state_dict(state)
    assert fresh.num_steps == 1
    assert torch.equal(torch.stack(fresh.pool_T.images), torch.stack(step.pool_T.images))
    x = torch.randn(4, 4, 64, 32)
    assert torch.equal(fresh.pool_S.query(x), step.pool_S.query(x))


# ----------------------------------------------------------------------------- training run

@pytest.fixture(scope="module")
def synthetic_tiny(tmp_path_factory):
    data = pytest.importorskip("edaan_fast.data.synthetic")
    from edaan_fast.data import read_image

    root = tmp_path_factory.mktemp("synthetic")
    src = data.synthetic(root, "source", "tiny", seed=0)
    tgt = data.synthetic(root, "target", "tiny", seed=0)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def load(records):
        arr = np.stack([np.asarray(read_image(r.path), dtype=np.float32) / 255 for r in records])
        return (torch.from_numpy(arr).permute(0, 3, 1, 2) - mean) / std

    x_s, x_t = load(src.train), load(tgt.train)
    y_s = torch.tensor([r.pid for r in src.train])
    masks = torch.stack([torch.from_numpy(data.load_mask(r.path)) for r in src.train])
    return x_s, y_s, x_t, masks.unsqueeze(1) > 0.5


def test_short_training_lowers_cycle_loss(synthetic_tiny):
    """~150 steps of the tiny preset on the synthetic set: the cycle loss falls by half.

    (That the attention nets find the person is checked through the trainer, with the runs'
    schedule and attention settings, in tests/test_attention_training.py: at this step-level
    setup's batch of 8 + 8 images and 5x learning rate the maps do not, and a ROC-AUC "above
    chance" here used to pass only because the untrained net's output followed brightness,
    which version 2 of the embedded set correlated with the person.)"""
    x_s, y_s, x_t, _ = synthetic_tiny
    torch.manual_seed(0)
    model = build_model("tiny", num_ids=int(y_s.max()) + 1, reid_stripes=1)
    step = EDAANTrainStep(model, EDAANObjective(BatchHardTriplet()))
    opt_g = torch.optim.Adam(model.generator_parameters(), 1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(model.discriminator_parameters(), 1e-3, betas=(0.5, 0.999))
    g = torch.Generator().manual_seed(0)
    pids = y_s.unique()
    cycle = []
    for _ in range(150):
        # PK batch: 4 identities x 2 images, and 8 random target images
        chosen = pids[torch.randperm(len(pids), generator=g)[:4]]
        idx = torch.cat([torch.nonzero(y_s == p).flatten()[torch.randperm(
            int((y_s == p).sum()), generator=g)[:2]] for p in chosen])
        idt = torch.randint(len(x_t), (8,), generator=g)
        log = step(x_s[idx], y_s[idx], x_t[idt], opt_g, opt_d, Phase())
        cycle.append(log["cycle"])
    assert np.mean(cycle[-25:]) < 0.5 * np.mean(cycle[:10]), cycle
