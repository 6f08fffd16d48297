"""The paper's printed attention setting flattens the maps (docs/attention.md): a short
training run of the ``tiny`` preset, scored against the true person masks of held-out images.

Measured after these 8 epochs (2-core Xeon, one thread, data version 4): std 0.03 and IoU 0.00
for both maps; on a 2-core AMD EPYC with two threads (2026-12-05), std 0.04 and IoU 0.00. Such
a map can still rank pixels: A_S scored ROC-AUC 0.86 and position AUC 0.70 there, but at a
spatial std of 0.04 the blend of eq. (1) is a global one. That the default setting learns the
person instead, read from the image (``position_auc``), is checked on the default run of
tests/test_learning.py (``test_attention_learns_the_person``).
"""

from __future__ import annotations

import pytest

from .test_learning import train_command


@pytest.mark.slow
def test_paper_attention_setting_collapses_to_a_flat_map(tmp_path_factory):
    run = train_command(tmp_path_factory, "paper", "--paper-attention", "--no-amp",
                        "--epochs", "8", "--phase-epoch", "8", "--eval-every", "0",
                        "--checkpoint-every", "0")
    after = run.report["attention_quality"]
    assert after["epoch"] == 8
    for net in ("A_S", "A_T"):
        assert after[net]["spatial_std"] < 0.1 and after[net]["iou"] < 0.2, after[net]
