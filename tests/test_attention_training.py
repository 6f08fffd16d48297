"""The attention nets learn the person on the embedded set, and the paper's printed setting
flattens them (docs/attention.md): two short training runs of the ``tiny`` preset, scored
against the true person masks of held-out images.

An untrained attention net already ranks source pixels with ROC-AUC ~0.8 (its output follows
brightness, and the source background is brighter than the person) and target pixels with
~0.3, with a flat map (spatial std ~0.02, IoU ~0). So the assertions are on what training has
to create: a spread-out map, overlap with the person at the 0.5 threshold, and a target map
that ranks the person above the background.
"""

from __future__ import annotations

import pytest

from edaan_fast.engine.run_config import PAPER_ATTENTION, RunConfig
from edaan_fast.engine.trainer import Trainer

SHORT = dict(epochs=8, phase_epoch=8, eval_every=0, checkpoint_every=0, progress=False)


def _attention_before_and_after(tmp_path, **overrides):
    trainer = Trainer(RunConfig(output_dir=str(tmp_path), **SHORT, **overrides))
    before = trainer.measure_attention()
    report = trainer.fit()
    assert before["epoch"] == 0 and report["attention"]["epoch"] == 8
    return before, report["attention"]


@pytest.mark.slow
def test_attention_learns_the_person(tmp_path):
    before, after = _attention_before_and_after(tmp_path / "default")
    s0, t0, s1, t1 = before["A_S"], before["A_T"], after["A_S"], after["A_T"]
    assert s0["spatial_std"] < 0.1 and t0["spatial_std"] < 0.1 and s0["iou"] < 0.3  # flat start
    assert s1["spatial_std"] > 0.2 and t1["spatial_std"] > 0.2, (s1, t1)
    assert s1["iou"] > 0.35 and s1["iou"] > s0["iou"] + 0.2, (s0, s1)
    assert s1["centre_contrast"] > 0.15, s1
    # the target map starts inverted (brighter person on a dark background) and must turn
    assert t0["auc"] < 0.45 and t1["auc"] > t0["auc"] + 0.15, (t0, t1)
    assert t1["centre_contrast"] > 0.05, t1


@pytest.mark.slow
def test_paper_attention_setting_collapses_to_a_flat_map(tmp_path):
    _, after = _attention_before_and_after(tmp_path / "paper", **PAPER_ATTENTION)
    for net in ("A_S", "A_T"):
        assert after[net]["spatial_std"] < 0.1 and after[net]["iou"] < 0.2, after[net]
