"""``benchmarks/compare_variants.py``: variant names to train options, and the report's
orderings (pure functions; no training)."""

from __future__ import annotations

import pytest

from benchmarks.compare_variants import summarise, variant_args


def test_variant_names_become_train_options():
    assert variant_args("edaan") == ["--variant", "edaan"]
    assert variant_args("daan-noattn") == ["--variant", "daan", "--no-attention"]
    assert variant_args("edaan-guided") == ["--variant", "edaan", "--mask-guidance", "10"]
    with pytest.raises(ValueError, match="unknown suffix -masked"):
        variant_args("edaan-masked")
    with pytest.raises(ValueError, match="unknown variant 'edan'"):
        variant_args("edan")


def _report(variant: str, mAP: float, **config) -> dict:
    config = {"variant": variant, "attention": variant != "direct", **config}
    metrics = {"rank1": mAP, "rank5": mAP, "rank10": mAP, "mAP": mAP, "mINP": mAP}
    return {"config": config, "metrics": metrics, "seconds": 1.0}


def test_orderings_use_the_guided_form_where_only_it_ran():
    reports = {
        "edaan-guided": {0: _report("edaan", 0.20, mask_guidance=10.0),
                         1: _report("edaan", 0.15, mask_guidance=10.0)},
        "edaan-noattn": {0: _report("edaan", 0.12, attention=False),
                         1: _report("edaan", 0.16, attention=False)},
        "direct": {0: _report("direct", 0.10), 1: _report("direct", 0.14)},
    }
    text, data = summarise(reports, [0, 1])
    assert "EDAAN with Quartet (mask-guided)" in text
    by_pair = {(o["better"], o["worse"]): o for o in data["orderings"]}
    assert set(by_pair) == {("edaan-guided", "edaan-noattn"), ("edaan-noattn", "direct"),
                            ("edaan-guided", "direct")}
    gaps = by_pair[("edaan-guided", "direct")]["gaps"]
    assert gaps == pytest.approx([10.0, 1.0])
    assert by_pair[("edaan-guided", "direct")]["holds"] is True
    assert by_pair[("edaan-guided", "edaan-noattn")]["holds"] is False  # 15 < 16 on seed 1
