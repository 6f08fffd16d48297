"""torch and DALI loaders: same batch structure, same value ranges, close eval outputs,
sampler order and resume, the optional-dependency message."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from edaan_fast.data import (
    Batch,
    PKSampler,
    SequentialBatchSampler,
    SyntheticPreset,
    build_dataset,
    build_loader,
)
from edaan_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.oracles import market_mini

MICRO = SyntheticPreset("loadertest", 32, 16, num_train_ids=12, num_test_ids=4, num_cams=2,
                        images_per_cam=2, num_distractors=0)
HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
LOADERS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI,
                                                                   reason="DALI not installed"))]
LOW = min(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
HIGH = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
BLACK = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return build_dataset("synthetic", tmp_path_factory.mktemp("syn"), preset=MICRO).train


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("train", [True, False])
def test_batch_structure_and_ranges(records, loader, train):
    it = build_loader(records, loader=loader, train=train, batch_size=8, num_workers=1,
                      image_size=(48, 24))
    batches = list(it)
    assert len(batches) == len(it) > 0
    for b in batches:
        assert isinstance(b, Batch) and b["images"] is b.images
        assert b.images.shape == (len(b), 3, 48, 24) and b.images.dtype == torch.float32
        for t in (b.pids, b.camids, b.index):
            assert t.dtype == torch.int64 and t.shape == (len(b),)
        assert LOW - 1e-4 <= b.images.min() and b.images.max() <= HIGH + 1e-4
        assert b.images.std() > 0.2  # real content, not a constant
        assert [records[i].pid for i in b.index] == b.pids.tolist()
        assert [records[i].camid for i in b.index] == b.camids.tolist()
    seen = torch.cat([b.index for b in batches])
    if train:
        assert len(seen) == len(records) // 8 * 8 and len(set(seen.tolist())) == len(seen)
        # pad 10 + random crop shifts the image in: black (normalised zero) borders appear
        black = torch.cat([torch.isclose(b.images, BLACK[None, :, None, None], atol=1e-5)
                           .all(1).flatten() for b in batches])
        assert black.float().mean() > 0.05
    else:
        assert seen.tolist() == list(range(len(records)))


@pytest.mark.parametrize("loader", LOADERS)
def test_pk_sampler_through_loader(records, loader):
    sampler = PKSampler(records, P=3, K=2, seed=0)
    order = [list(b) for b in PKSampler(records, P=3, K=2, seed=0)]
    it = build_loader(records, loader=loader, sampler=sampler, num_workers=1,
                      image_size=(32, 16))
    got = [b.index.tolist() for b in it]
    assert got == order
    for b in it:  # second epoch: reshuffled, still 3 identities x 2
        counts = torch.bincount(b.pids)
        assert sorted(counts[counts > 0].tolist()) == [2, 2, 2]


@pytest.mark.parametrize("loader", LOADERS)
def test_loader_resume_continues_order(records, loader):
    def make():
        return build_loader(records, loader=loader, sampler=PKSampler(records, 2, 2, seed=5),
                            num_workers=1, image_size=(32, 16))

    full = [b.index.tolist() for b in make()]
    first = make()
    head = []
    for b in first:
        head.append(b.index.tolist())
        if len(head) == 3:
            state = first.state_dict()
            break
    assert state["position"] == 3 and state["epoch"] == 0
    resumed = make()
    resumed.load_state_dict(state)
    assert head + [b.index.tolist() for b in resumed] == full
    # the abandoned loader itself also continues where its caller stopped
    assert [b.index.tolist() for b in first] == full[3:]


def _eval_images(records, loader, size):
    it = build_loader(records, loader=loader, train=False, batch_size=len(records),
                      num_workers=1, image_size=size)
    return next(iter(it)).images


@pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")
@pytest.mark.parametrize("size,mean_tol,max_tol", [
    ((32, 16), 1e-5, 1e-4),   # no resize: the same libjpeg-turbo decode, identical pixels
    ((64, 32), 0.01, 0.05),   # 2x upscale: bilinear in both, rounding differs by ~1 level
    ((24, 12), 0.02, 0.35),   # downscale: Pillow's and DALI's antialias kernels differ a
])                            # little; up to ~20/255 at sharp edges, tiny on average
def test_eval_torch_and_dali_agree(records, size, mean_tol, max_tol):
    a = _eval_images(records[:32], "torch", size)
    b = _eval_images(records[:32], "dali", size)
    diff = (a - b).abs()
    assert diff.mean() < mean_tol and diff.max() < max_tol, (diff.mean(), diff.max())


@pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")
@pytest.mark.skipif(market_mini() is None, reason="real Market-1501 subset not available")
def test_eval_torch_and_dali_agree_on_real_images():
    recs = build_dataset("market1501", market_mini()).query[:48]
    a, b = (_eval_images(recs, lo, (256, 128)) for lo in ("torch", "dali"))
    diff = (a - b).abs()
    # 128x64 JPEGs upscaled to 256x128: at most about one 8-bit level (1/255/0.229 = 0.017)
    assert diff.mean() < 0.01 and diff.max() < 0.05


def test_dali_missing_says_how_to_install(records, monkeypatch):
    from edaan_fast.data import loaders

    monkeypatch.setattr(loaders, "dali_available", lambda: False)
    with pytest.raises(ImportError, match=r'pip install "edaan_fast\[dali\]"'):
        build_loader(records, loader="dali")


def test_bad_loader_arguments(records):
    with pytest.raises(ValueError, match="choices: torch, dali"):
        build_loader(records, loader="ffcv")
    with pytest.raises(ValueError, match="image size"):
        build_loader(records, image_size=(0, 16))
    with pytest.raises(Exception, match="empty"):
        build_loader([], image_size=(32, 16))


def test_torch_eval_is_deterministic(records):
    sampler = SequentialBatchSampler(len(records), 16)
    a = [b.images for b in build_loader(records, train=False, sampler=sampler,
                                        num_workers=0, image_size=(40, 20))]
    b = [b.images for b in build_loader(records, train=False, sampler=sampler,
                                        num_workers=2, image_size=(40, 20))]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def _shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[y, x] = img[y + dy, x + dx]``, black (normalised zero) outside."""
    out = BLACK[:, None, None].expand_as(img).clone()
    h, w = img.shape[1:]
    ys, yd = max(dy, 0), max(-dy, 0)
    xs, xd = max(dx, 0), max(-dx, 0)
    out[:, yd:h - ys, xd:w - xs] = img[:, ys:h - yd, xs:w - xd]
    return out


@pytest.mark.parametrize("loader", LOADERS)
def test_train_crop_is_a_padded_shift_of_the_eval_image(records, loader):
    """Both backends: train (no flip) == eval image shifted by (dy, dx) in [-pad, pad]."""
    pad, recs = 4, records[:12]
    sampler = SequentialBatchSampler(len(recs), len(recs))
    kw = {"loader": loader, "sampler": sampler, "num_workers": 1, "image_size": (32, 16),
          "pad": pad}
    train = next(iter(build_loader(recs, train=True, flip_p=0.0, **kw))).images
    ref = next(iter(build_loader(recs, train=False, **kw))).images
    shifts = []
    for t, r in zip(train, ref):
        match = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
                 if torch.allclose(t, _shift(r, dy, dx), atol=1e-5)]
        assert match, "train image is not a padded shift of the eval image"
        shifts.append(match[0])
    assert len(set(shifts)) > 3  # and the shift is random


@pytest.mark.skipif(not HAS_DALI, reason="needs nvidia-dali")
def test_dali_keeps_its_pipeline_across_epochs_stopped_early(records):
    """The trainer stops each epoch after its iterations, before the loader is exhausted: the
    pipeline is drained and reset (built once, nvJPEG initialised once), the next epoch resumes
    at the first batch not delivered, and a full pass still sees every batch."""
    from edaan_fast.data import RandomBatchSampler

    sampler = RandomBatchSampler(len(records), 8, seed=3)
    dl = build_loader(records, loader="dali", sampler=sampler, device="cpu", num_workers=1,
                      image_size=(64, 32))
    plan = [list(b) for b in RandomBatchSampler(len(records), 8, seed=3)]
    it = iter(dl)
    first = [next(it).index.tolist() for _ in range(2)]
    it.close()  # stopped early, with batches prefetched
    rest = [b.index.tolist() for b in dl]
    assert first + rest == plan
    assert dl._dali._builds == 1
    dl.set_epoch(1)
    assert sum(len(b) for b in dl) == len(plan) * 8 and dl._dali._builds == 1
