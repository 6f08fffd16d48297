"""``benchmarks/translation_effect.py``: the domain probe separates what differs and not what
does not, the masked pixel change, and a run's report: a translation that keeps every pixel
leaves the features unchanged, one that replaces them does not."""

from __future__ import annotations

import pytest
import torch

from benchmarks.translation_effect import domain_probe, feature_cosine, masked_change, measure
from edaan_fast.engine.checkpoint import model_config_to_dict, save_checkpoint
from edaan_fast.models import build_model
from tests.conftest import requires_ops
from tests.test_evaluate_cli import _run_dict, synthetic_cache  # noqa: F401  (fixture)


def test_domain_probe_separates_shifted_features_and_not_identical_ones():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    assert abs(domain_probe(a, b) - 0.5) < 0.08
    shifted = b + torch.cat([torch.full((400, 1), 3.0), torch.zeros(400, 15)], dim=1)
    assert domain_probe(a, shifted) > 0.9


def test_feature_cosine_and_masked_change():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert feature_cosine(a, a) == pytest.approx(1.0)
    assert feature_cosine(a, torch.tensor([[0.0, 1.0], [0.0, -1.0]])) == pytest.approx(-0.5)
    x = torch.zeros(2, 3, 4, 2)
    y = x.clone()
    y[:, :, :2] = 0.6   # the top half changes by 0.6, the bottom by 0.0
    masks = torch.zeros(2, 4, 2)
    masks[:, 2:] = 1    # the person is the bottom half
    assert masked_change(x, y, masks) == pytest.approx((0.0, 0.6))


def _run(folder, bias: float):
    """A saved tiny run whose source attention map is ``sigmoid(bias)`` everywhere."""
    torch.manual_seed(0)
    model = build_model("tiny")
    head = model.attention_S.head[1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(bias)
    folder.mkdir()
    save_checkpoint(folder / "final.pt", {"model_config": model_config_to_dict(model.config),
                                          "model": model.state_dict(), "epoch": 1,
                                          "run": _run_dict(None)})
    return folder


@requires_ops
@pytest.mark.usefixtures("synthetic_cache")
def test_a_translation_that_keeps_every_pixel_keeps_the_features(tmp_path):
    keep = measure(_run(tmp_path / "keep", 50.0), [tmp_path / "keep"], count=48)
    (row,) = keep["reid"]
    assert row["cos(f(x_S), f(x_ST))"] == pytest.approx(1.0, abs=1e-6)
    assert row["probe x_S vs target"] == row["probe x_ST vs target"]
    replace = measure(_run(tmp_path / "replace", -50.0), [tmp_path / "replace"], count=48)
    assert replace["reid"][0]["cos(f(x_S), f(x_ST))"] < 0.99


def test_a_missing_run_is_one_line_and_status_2(tmp_path, capsys):
    from benchmarks.translation_effect import main

    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "final.pt does not exist" in err[0]
