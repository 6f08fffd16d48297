"""``edaan_fast.FeatureExtractor``: the features ``evaluate --export-features`` writes, for every
kind of input, with flip averaging and L2 normalisation, and clear errors for bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import edaan_fast
from edaan_fast.data import DatasetError
from edaan_fast.engine.checkpoint import CheckpointError
from edaan_fast.evaluate import main as evaluate_main
from tests.conftest import requires_ops
from tests.test_evaluate_cli import _save, synthetic_cache  # noqa: F401  (fixture)

pytestmark = requires_ops


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, synthetic_cache):  # noqa: F811
    return _save(tmp_path_factory.mktemp("fx") / "ckpt.pt", None, seed=3)


def _exported(ckpt, out, *flags):
    assert evaluate_main(["--checkpoint", str(ckpt), "--export-features", str(out),
                          "--num-workers", "0", "-q", *flags]) == 0
    z = np.load(out)
    paths = [str(p) for p in np.concatenate([z["query_paths"], z["gallery_paths"]])]
    feats = np.concatenate([z["query_features"], z["gallery_features"]])
    return paths, torch.from_numpy(feats)


@pytest.mark.parametrize("flip", [False, True])
def test_features_equal_the_evaluation_export(ckpt, tmp_path, flip):
    paths, expected = _exported(ckpt, tmp_path / "f.npz", *(["--flip"] if flip else []))
    extract = edaan_fast.FeatureExtractor(ckpt, device="cpu", flip=flip, batch_size=50)
    got = extract(paths)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert expected.shape == (210, extract.feature_dim)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # a real difference, far above the tolerance: flip changes the features
    other = edaan_fast.FeatureExtractor(ckpt, device="cpu", flip=not flip)(paths[:8])
    assert (other - expected[:8]).abs().max() > 1e-3


def test_every_input_kind_gives_the_same_features(ckpt, synthetic_cache):  # noqa: F811
    from edaan_fast.data import build_dataset

    ds = build_dataset("synthetic", domain="target", preset="tiny", seed=0)
    paths = [r.path for r in ds.query[:5]]
    extract = edaan_fast.FeatureExtractor(ckpt, device="cpu")
    ref = extract(paths)
    pil = [Image.open(p) for p in paths]
    arrays = [np.array(im.convert("RGB")) for im in pil]
    tensors = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
    for images in (pil, arrays, np.stack(arrays), tensors, torch.stack(tensors),
                   extract.preprocess(paths)):
        torch.testing.assert_close(extract(images), ref, atol=0, rtol=0)
    # one image alone = a batch of one
    torch.testing.assert_close(extract(paths[2]), ref[2:3], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(extract(arrays[2]), ref[2:3], atol=1e-6, rtol=1e-5)
    # the images differ, so their features do
    assert torch.cdist(ref, ref).fill_diagonal_(1).min() > 1e-3


def test_normalize(ckpt, synthetic_cache):  # noqa: F811
    from edaan_fast.data import build_dataset

    paths = [r.path for r in build_dataset("synthetic", domain="target", preset="tiny",
                                           seed=0).gallery[:6]]
    raw = edaan_fast.FeatureExtractor(ckpt, device="cpu")(paths)
    unit = edaan_fast.FeatureExtractor(ckpt, device="cpu", normalize=True)(paths)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(6), atol=1e-2)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(unit, raw / raw.norm(dim=1, keepdim=True))


def test_bad_inputs(ckpt, tmp_path):
    extract = edaan_fast.FeatureExtractor(ckpt, device="cpu")
    with pytest.raises(ValueError, match=r"uint8 numpy array \[H, W, 3\].*got float32"):
        extract(np.zeros((20, 10, 3), np.float32))
    with pytest.raises(ValueError, match=r"preprocessed images \[N, 3, 64, 32\].*got \[2, 3, "
                                         r"32, 32\]"):
        extract(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="got dict"):
        extract({"a": 1})
    with pytest.raises(ValueError, match="no images given"):
        extract([])
    with pytest.raises(DatasetError, match="image file not found: .*nope.jpg"):
        extract([str(tmp_path / "nope.jpg")])
    with pytest.raises(CheckpointError, match="does not exist"):
        edaan_fast.FeatureExtractor(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not a device"):
        edaan_fast.FeatureExtractor(ckpt, device="gpu7")


def test_a_model_without_attention(tmp_path, synthetic_cache):  # noqa: F811
    path = _save(tmp_path / "noattn.pt", None, no_attention=True, seed=5)
    paths, expected = _exported(path, tmp_path / "f.npz")
    got = edaan_fast.FeatureExtractor(path, device="cpu")(paths[:40])
    torch.testing.assert_close(got, expected[:40], atol=1e-6, rtol=1e-5)
