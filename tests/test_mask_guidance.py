"""Mask guidance of the attention nets (``train --mask-guidance``): the loss by hand, which nets
it reaches in which phase, that it teaches a map whatever mask it is given, the crops it draws,
resume, and the configuration errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from edaan_fast.data import DatasetError
from edaan_fast.data.person_masks import MANIFEST, person_mask_path
from edaan_fast.data.synthetic import load_mask
from edaan_fast.engine.mask_guidance import GuideBatch, MaskGuidance
from edaan_fast.engine.run_config import RunConfigError, source_dataset, target_dataset
from edaan_fast.engine.steps import EDAANTrainStep, Phase
from edaan_fast.engine.trainer import Trainer, train
from edaan_fast.losses import EDAANObjective, LossWeights, mask_guidance_loss
from edaan_fast.models import EDAAN, model_config

from .test_trainer import MICRO_MODEL, CopyCheckpoint, assert_same_weights, micro, weights


def test_loss_by_hand():
    a = torch.tensor([0.9, 0.2, 0.5, 1.0]).view(1, 1, 2, 2)
    m = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 2, 2)
    # -ln 0.9, -ln 0.8, -ln 0.5, and a saturated wrong pixel costs -ln(1e-4) (1 - 1e-4 as a
    # float32), not infinity
    floor = 1.0 - torch.tensor(1 - 1e-4).item()
    want = (-math.log(0.9) - math.log(0.8) - math.log(0.5) - math.log(floor)) / 4
    assert mask_guidance_loss((a, m)).item() == pytest.approx(want, rel=1e-5)
    flat = torch.full((2, 1, 3, 2), 0.5)
    assert mask_guidance_loss((flat, m.new_ones(2, 1, 3, 2)),
                              (flat, m.new_zeros(2, 1, 3, 2))).item() == pytest.approx(
        2 * math.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        mask_guidance_loss((a, m.view(1, 1, 4, 1)))
    with pytest.raises(ValueError, match="at least one"):
        mask_guidance_loss()


class FixedGuide:
    """A stand-in :class:`MaskGuidance`: the same crops and masks at every step; counts calls."""

    def __init__(self, x_s, m_s, x_t, m_t):
        self.fixed = GuideBatch(x_s, m_s, x_t, m_t)
        self.calls = 0

    def batch(self, step, device):
        self.calls += 1
        return self.fixed


def _micro_model(seed=0):
    torch.manual_seed(seed)
    return EDAAN(model_config("tiny", image_size=(32, 16), num_ids=4,
                              **{**MICRO_MODEL, "attn_widths": (8, 8)}))


def _crops(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 16, generator=g)


def _left_half(n=4):
    """A mask no term of eq. (9) asks for: the left half of the crop."""
    m = torch.zeros(n, 1, 32, 16)
    m[..., :8] = 1.0
    return m


def _step(model, weight, guide):
    objective = EDAANObjective(None, LossWeights(mask_guidance=weight, cycle=1.0))
    return EDAANTrainStep(model, objective, pool_size=0, guide=guide)


def _optimisers(model):
    return (torch.optim.Adam(model.generator_parameters(), lr=2e-3, betas=(0.5, 0.999)),
            torch.optim.Adam(model.discriminator_parameters(), lr=2e-4, betas=(0.5, 0.999)))


def test_the_guide_term_is_logged_and_reaches_the_nets_by_phase():
    model = _micro_model()
    x_s, x_t = _crops(seed=1), _crops(seed=2)
    guide = FixedGuide(_crops(seed=3), _left_half(), _crops(seed=4), _left_half())
    step = _step(model, 1.0, guide)
    opt_g, opt_d = _optimisers(model)
    labels = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        want = mask_guidance_loss((model.attention_S(guide.fixed.source), _left_half()),
                                  (model.attention_T(guide.fixed.target), _left_half()))
    log = step(x_s, labels, x_t, opt_g, opt_d, Phase(True, False, False))
    assert log["guide"] == pytest.approx(want.item(), rel=1e-5) and guide.calls == 1
    # after the switch with refinement: A_T alone, so the term is one pair and A_S stays put
    a_s = [p.detach().clone() for p in model.attention_S.parameters()]
    with torch.no_grad():
        want_t = mask_guidance_loss((model.attention_T(guide.fixed.target), _left_half()))
    log = step(x_s, labels, x_t, opt_g, opt_d, Phase(False, True, True))
    assert log["guide"] == pytest.approx(want_t.item(), rel=1e-5) and guide.calls == 2
    assert all(torch.equal(p, q) for p, q in zip(model.attention_S.parameters(), a_s))
    # frozen without refinement: no term, no crops drawn
    log = step(x_s, labels, x_t, opt_g, opt_d, Phase(False, True, False))
    assert log["guide"] == 0.0 and guide.calls == 2
    # without a guide the term is 0 and the total does not see it
    log = _step(_micro_model(), 1.0, None)(x_s, labels, x_t, *_optimisers(model),
                                           Phase(True, False, False))
    assert log["guide"] == 0.0


def test_guidance_teaches_the_maps_a_mask_nothing_else_asks_for():
    """The left half of the crop as the "person": guided, both maps learn it; unguided, they stay
    as flat as they start (0.5 everywhere)."""
    x_s, x_t = _crops(seed=1), _crops(seed=2)
    crops_s, crops_t = _crops(seed=3), _crops(seed=4)
    labels = torch.tensor([0, 0, 1, 1])
    contrast = {}
    for weight in (0.0, 1.0):
        model = _micro_model()
        step = _step(model, weight, FixedGuide(crops_s, _left_half(), crops_t, _left_half()))
        opt_g, opt_d = _optimisers(model)
        for _ in range(30):
            step(x_s, labels, x_t, opt_g, opt_d, Phase(True, False, False))
        with torch.no_grad():
            maps = [model.attention_S(crops_s), model.attention_T(crops_t)]
        contrast[weight] = [(a[..., :8].mean() - a[..., 8:].mean()).item() for a in maps]
    # measured: 0.47 / 0.37 guided after 40 steps, 0.001 / 0.0003 unguided
    assert all(c > 0.2 for c in contrast[1.0]), contrast
    assert all(abs(c) < 0.05 for c in contrast[0.0]), contrast


# ----------------------------------------------------------------------------- with the trainer


def _ground_truth_masks(dataset, folder):
    """A person-mask folder of a synthetic data set (every split), from its own masks."""
    folder.mkdir(parents=True, exist_ok=True)
    for rec in [*dataset.train, *dataset.query, *dataset.gallery]:
        path = person_mask_path(folder, rec.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((load_mask(rec.path) > 0.5) * 255).astype(np.uint8)).save(path)
    (folder / MANIFEST).write_text(json.dumps({"format": 1, "dataset": "synthetic",
                                               "segmenter": "ground truth", "no_person": []}))
    return folder


@pytest.fixture(scope="module")
def mask_folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guide_masks")
    run = micro(tmp).resolve().to_dict()
    return (str(_ground_truth_masks(source_dataset(run), tmp / "source")),
            str(_ground_truth_masks(target_dataset(run), tmp / "target")))


def test_guide_crops_depend_on_the_step_only_and_match_their_masks(mask_folders, tmp_path):
    run = micro(tmp_path).resolve()
    source, target = (source_dataset(run.to_dict()).train, target_dataset(run.to_dict()).train)
    guide = MaskGuidance(source, target, *mask_folders, run.image_size, 4, seed=0)
    again = MaskGuidance(source, target, *mask_folders, run.image_size, 4, seed=0)
    b0, b0_again, b1 = guide.batch(0, "cpu"), again.batch(0, "cpu"), guide.batch(1, "cpu")
    assert torch.equal(b0.source, b0_again.source) and torch.equal(b0.target_masks,
                                                                   b0_again.target_masks)
    assert not torch.equal(b0.source, b1.source)
    h, w = run.image_size
    assert b0.source.shape == (4, 3, h, w) and b0.source_masks.shape == (4, 1, h, w)
    # each mask is its own crop's, resized as the reader resizes it
    index = torch.randperm(len(guide.source.records),
                           generator=torch.Generator().manual_seed(0))[:4]
    for k, i in enumerate(index):
        truth = torch.from_numpy(load_mask(guide.source.records[i].path) > 0.5).float()
        resized = torch.nn.functional.interpolate(truth[None, None], size=(h, w),
                                                  mode="bilinear", antialias=True)[0]
        assert (b0.source_masks[k] - resized).abs().max() < 0.01


def test_a_guided_run_resumes_bit_for_bit(mask_folders, tmp_path):
    guided = dict(mask_guidance=1.0, source_person_masks=mask_folders[0],
                  target_person_masks=mask_folders[1], phase_epoch=1)
    train(micro(tmp_path, "straight", **guided),
          hooks=[CopyCheckpoint(1, tmp_path / "epoch1.pt")])
    train(micro(tmp_path, "resumed", **guided), resume=tmp_path / "epoch1.pt")
    straight = weights(tmp_path / "straight" / "final.pt")
    assert_same_weights(weights(tmp_path / "resumed" / "final.pt"), straight)
    train(micro(tmp_path, "unguided", phase_epoch=1))
    unguided = weights(tmp_path / "unguided" / "final.pt")
    attention = [k for k in straight if k.startswith("attention_S.")]
    assert attention and not all(torch.equal(straight[k], unguided[k]) for k in attention)


@pytest.mark.parametrize("overrides, match", [
    (dict(variant="direct"), "has none"),
    (dict(attention=False), "has none"),
    (dict(), "pass --source-person-masks and --target-person-masks"),
    (dict(source_person_masks="m"), "pass --target-person-masks"),
    (dict(mask_guidance=-1.0), "mask_guidance must be a number >= 0"),
])
def test_configuration_errors(tmp_path, overrides, match):
    with pytest.raises(RunConfigError, match=match):
        micro(tmp_path, **{"mask_guidance": 1.0, **overrides}).resolve()


def test_missing_training_masks_are_named_before_training(tmp_path):
    """A mask folder written for the test splits only: the first missing training mask is
    named, exit 2, one line, nothing written."""
    folder = tmp_path / "masks"
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps({"format": 1, "no_person": []}))
    proc = subprocess.run([sys.executable, "-m", "edaan_fast.train", "--mask-guidance", "1",
                           "--source-person-masks", str(folder), "--target-person-masks",
                           str(folder), "--output-dir", str(tmp_path / "run"), "--no-progress"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("edaan_fast.train: error: --mask-guidance needs the person masks "
                           "of the source training split: missing person mask "), line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    with pytest.raises(DatasetError):
        Trainer(micro(tmp_path, "t", mask_guidance=1.0, source_person_masks=str(folder),
                      target_person_masks=str(folder)))
