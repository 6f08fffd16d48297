"""``benchmarks/background_swap.py``: the blur against a direct convolution, the person fill,
the paste, and the data set it writes (re-read by the Market-1501 reader)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from benchmarks.background_swap import fill_person, gaussian_blur, main, paste
from edaan_fast.data import build_dataset

RED, BLUE, GREEN = (220.0, 20.0, 20.0), (20.0, 20.0, 220.0), (20.0, 200.0, 20.0)
YELLOW = (230.0, 230.0, 20.0)


def test_blur_matches_a_direct_2d_convolution_in_float64():
    x = torch.rand(2, 13, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = 1.5
    r = math.ceil(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = k1 / k1.sum()
    ref = torch.zeros_like(x)
    for i in range(13):
        for j in range(9):
            for di in range(-r, r + 1):
                for dj in range(-r, r + 1):
                    if 0 <= i + di < 13 and 0 <= j + dj < 9:
                        ref[:, i, j] += k1[di + r] * k1[dj + r] * x[:, i + di, j + dj]
    torch.testing.assert_close(gaussian_blur(x, sigma), ref, rtol=1e-12, atol=1e-12)


def _scene(h=48, w=24, person=(10, 40, 6, 18), colour=RED, background=BLUE):
    img = torch.tensor(background).view(3, 1, 1).expand(3, h, w).clone()
    mask = torch.zeros(h, w)
    y0, y1, x0, x1 = person
    img[:, y0:y1, x0:x1] = torch.tensor(colour).view(3, 1, 1)
    mask[y0:y1, x0:x1] = 1
    return img, mask


def test_fill_person_removes_the_person_and_keeps_the_far_background():
    img, mask = _scene()
    out = fill_person(img, mask)
    inside = out[:, 10:40, 6:18]
    # the red person is gone: every filled pixel is much bluer than red
    assert (inside[2] - inside[0]).min() > 150
    torch.testing.assert_close(out[:, :4], img[:, :4])  # far from the person: untouched


def test_paste_keeps_the_person_exactly_and_takes_the_rest_from_the_background():
    person_img, mask = _scene(colour=RED, background=GREEN)
    background = torch.tensor(BLUE).view(3, 1, 1).expand(3, 48, 24).clone()
    out = paste(person_img, mask, background, soften=0)
    torch.testing.assert_close(out[:, 10:40, 6:18], person_img[:, 10:40, 6:18])
    torch.testing.assert_close(out[:, :10], background[:, :10])  # no green left outside
    soft = paste(person_img, mask, background)  # softened edges stay between the two
    assert torch.all(soft >= torch.minimum(person_img, background) - 1e-4)
    assert torch.all(soft <= torch.maximum(person_img, background) + 1e-4)


def _write(root, name, img):
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.permute(1, 2, 0).round().byte().numpy()).save(root / name)


def _pair(tmp_path):
    """A red-person source (2 ids x 2 crops on green) and a blue-background target whose own
    person is yellow and stands elsewhere, each with its person masks."""
    src = tmp_path / "src" / "Market-1501-v15.09.15"
    tgt = tmp_path / "tgt" / "Market-1501-v15.09.15"
    for d, colour, back, box in ((src, RED, GREEN, (10, 40, 6, 18)),
                                 (tgt, YELLOW, BLUE, (2, 22, 12, 22))):
        img, mask = _scene(person=box, colour=colour, background=back)
        names = {"bounding_box_train": ["0002_c1s1_000001_00.png", "0002_c2s1_000002_00.png",
                                        "0005_c1s1_000003_00.png", "0005_c2s1_000004_00.png"],
                 "query": ["0002_c1s1_000010_00.png"],
                 "bounding_box_test": ["0002_c2s1_000011_00.png", "0000_c1s1_000012_00.png"]}
        masks = tmp_path / f"masks-{d.parent.name}"
        for split, files in names.items():
            for f in files:
                _write(d / split, f, img)
                _write(masks / split, f, (mask * 255)[None].expand(3, -1, -1))
    return tmp_path / "src", tmp_path / "masks-src", tmp_path / "tgt", tmp_path / "masks-tgt"


def test_the_written_data_set_reads_back_with_every_crop_pasted(tmp_path, capsys):
    src, src_masks, tgt, tgt_masks = _pair(tmp_path)
    out = tmp_path / "swap"
    assert main(["--output", str(out), "--source-root", str(src), "--source-masks",
                 str(src_masks), "--target-root", str(tgt), "--target-masks",
                 str(tgt_masks)]) == 0
    assert '"pasted": 4' in capsys.readouterr().out
    before, after = build_dataset("market1501", root=src), build_dataset("market1501", root=out)
    assert len(after.train) == 2 * len(before.train)
    assert after.num_train_pids == before.num_train_pids == 2
    assert sorted((r.pid, r.camid) for r in after.query) == [(2, 0)]
    assert sorted((r.pid, r.camid) for r in after.gallery) == [(0, 0), (2, 1)]  # distractor kept
    pasted = [r for r in after.train if r.path.endswith("_01.jpg")]
    assert len(pasted) == 4
    img = np.asarray(Image.open(pasted[0].path), dtype=np.float32)
    assert np.abs(img[20:30, 9:15] - RED).max() < 25          # the source person, kept
    assert np.abs(img[42:, :] - BLUE).max() < 25              # the target's background
    assert np.abs(img[4:8, 18:22] - BLUE).max() < 40          # its person filled in
    assert (img[..., 1] > 150).sum() == 0                      # no yellow, no green
    # a non-empty output folder is refused with status 2 and one line
    assert main(["--output", str(out), "--source-root", str(src), "--source-masks",
                 str(src_masks), "--target-root", str(tgt), "--target-masks",
                 str(tgt_masks)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0]
    # masks that do not cover the target: named, status 2, nothing written
    assert main(["--output", str(tmp_path / "new"), "--source-root", str(src),
                 "--source-masks", str(src_masks), "--target-root", str(tgt),
                 "--target-masks", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no target training crop has a mask" in err[0]
    assert not (tmp_path / "new").exists()
