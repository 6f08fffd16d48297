"""Person masks of real data sets: the folder's reader and its errors, the writer (with a stand-in
segmenter), the attention scores and the commands that take a mask folder; MediaPipe's
segmenter itself on real crops where the ``[masks]`` extra and the shared real data are
present."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from edaan_fast.data import DatasetError, Record
from edaan_fast.data.person_masks import (
    MANIFEST,
    mask_key,
    person_mask_path,
    read_manifest,
    read_person_masks,
    write_person_masks,
)
from edaan_fast.masks import main as masks_main

from .conftest import shared_data_dir


def _crops(folder, n=6, h=32, w=16, seed=0):
    """``n`` RGB crops under ``folder/query``: a bright upright ellipse (the 'person') on a dark
    noisy background, at random horizontal offsets; returns the records and the true masks."""
    rng = np.random.default_rng(seed)
    (folder / "query").mkdir(parents=True)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    records, truths = [], []
    for i in range(n):
        cx = w / 2 + rng.uniform(-3, 3)
        person = ((xx - cx) / (0.25 * w)) ** 2 + ((yy - h / 2) / (0.4 * h)) ** 2 < 1
        img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
        img[person] = 200
        path = folder / "query" / f"{i + 1:04d}_c1s1_{i:06d}_00.png"
        Image.fromarray(img).save(path)
        records.append(Record(str(path), i + 1, 0))
        truths.append(person)
    return records, truths


class BrightPixels:
    """A stand-in segmenter: bright pixels are the person; a crop with none has no person."""

    name = "bright-pixels"

    def __call__(self, image):
        p = (image.mean(axis=2) > 128).astype(np.float32)
        return p if p.any() else None


def test_writer_then_reader_round_trip_and_crops_without_a_person(tmp_path):
    records, truths = _crops(tmp_path / "data")
    dark = tmp_path / "data" / "query" / "0099_c1s1_000099_00.png"
    Image.fromarray(np.zeros((32, 16, 3), np.uint8)).save(dark)
    records.append(Record(str(dark), 99, 0))
    manifest = write_person_masks(records, tmp_path / "masks", BrightPixels(), dataset="toy",
                                  progress=False)
    assert manifest["no_person"] == ["query/0099_c1s1_000099_00"]
    assert manifest["images"] == 7 and manifest["segmenter"] == "bright-pixels"
    png = np.asarray(Image.open(person_mask_path(tmp_path / "masks", records[0].path)))
    assert png.dtype == np.uint8 and set(np.unique(png)) == {0, 255}
    kept, masks = read_person_masks(records, tmp_path / "masks")
    assert kept == records[:6] and masks.shape == (6, 1, 32, 16)
    np.testing.assert_array_equal(masks[:, 0].numpy() > 0.5, np.stack(truths))
    # resized on request (bilinear: values stay in [0, 1])
    _, small = read_person_masks(records, tmp_path / "masks", size=(16, 8))
    assert small.shape == (6, 1, 16, 8) and 0 <= small.min() and small.max() <= 1


def test_writer_resumes_and_keeps_what_is_written(tmp_path):
    records, _ = _crops(tmp_path / "data")
    calls = []

    class Counting(BrightPixels):
        def __call__(self, image):
            calls.append(1)
            return super().__call__(image)

    write_person_masks(records[:3], tmp_path / "masks", Counting(), progress=False)
    write_person_masks(records, tmp_path / "masks", Counting(), progress=False)
    assert len(calls) == 6  # 3, then only the 3 new ones
    assert len(read_person_masks(records, tmp_path / "masks")[0]) == 6


@pytest.fixture
def mask_folder(tmp_path):
    records, _ = _crops(tmp_path / "data")
    write_person_masks(records, tmp_path / "masks", BrightPixels(), progress=False)
    return records, tmp_path / "masks"


def test_missing_resized_and_non_binary_masks_are_named(mask_folder):
    records, root = mask_folder
    first = person_mask_path(root, records[1].path)
    first.unlink()
    with pytest.raises(DatasetError, match=f"missing person mask {first} for image"):
        read_person_masks(records, root)
    Image.fromarray(np.zeros((30, 16), np.uint8)).save(first)
    with pytest.raises(DatasetError, match=f"person mask {first} is 30x16, its image .* is "
                                           "32x16"):
        read_person_masks(records, root)
    grey = np.zeros((32, 16), np.uint8)
    grey[5, 5] = 128
    Image.fromarray(grey).save(first)
    with pytest.raises(DatasetError, match=f"person mask {first} is not binary"):
        read_person_masks(records, root)


def test_a_folder_that_is_not_a_mask_folder_is_refused(tmp_path, mask_folder):
    with pytest.raises(DatasetError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=f"has no {MANIFEST}.*python -m edaan_fast.masks"):
        read_manifest(tmp_path / "empty")
    (tmp_path / "empty" / MANIFEST).write_text(json.dumps({"format": 99}))
    with pytest.raises(DatasetError, match="not a person-mask manifest"):
        read_manifest(tmp_path / "empty")
    assert mask_key("/x/bounding_box_test/0001_c1s1_1_00.jpg") == \
        "bounding_box_test/0001_c1s1_1_00"


def test_attention_scores_against_a_mask_folder(mask_folder):
    """``evaluate_attention`` with a mask folder: a net that outputs the true mask scores
    position AUC 1; an inverted one 0; the crop without a person is left out."""
    from edaan_fast.evaluation.evaluator import evaluate_attention

    records, root = mask_folder

    class Net(torch.nn.Module):
        def __init__(self, sign):
            super().__init__()
            self.sign = sign

        def forward(self, x):  # the bright pixels of the (normalised) input
            bright = (x.mean(1, keepdim=True) > 0).float()
            return bright if self.sign > 0 else 1 - bright

    class Model(torch.nn.Module):
        def __init__(self, sign):
            super().__init__()
            self.attention_S = self.attention_T = Net(sign)

    for sign, want in ((1, 1.0), (-1, 0.0)):
        q = evaluate_attention(Model(sign), {"A_T": records}, image_size=(32, 16),
                               person_masks={"A_T": root})["A_T"]
        assert q.images == 6 and q.position_auc == pytest.approx(want, abs=0.02), q


def test_masks_command_without_the_extra_names_the_install_command(tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "mediapipe.python.solutions", None)
    status = masks_main(["--dataset", "market1501", "--data-root", str(tmp_path),
                         "--output-dir", str(tmp_path / "m"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "pip install 'edaan_fast[masks]'" in err


def test_train_refuses_a_wrong_mask_folder_before_training(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edaan_fast.train", "--target-person-masks",
                           str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "run"),
                           "--no-progress"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("edaan_fast.train: error: person-mask folder")
    assert "does not exist" in lines[-1] and not (tmp_path / "run" / "checkpoint.pt").exists()


REAL = shared_data_dir()


@pytest.mark.skipif(REAL is None, reason="../shared/data (real crops) not present")
def test_mediapipe_segmenter_finds_the_person_on_real_crops():
    """The segmenter on 16 real Market-1501 and CUHK03 crops: a person in nearly every one,
    covering a person-sized, centred part of the crop."""
    if os.environ.get("EDAAN_FAST_REQUIRE_MASKS") != "1":  # CI's masks environment sets it
        pytest.importorskip("mediapipe", reason="the [masks] extra (MediaPipe) is not installed")
    from edaan_fast.data.segmenter import PersonSegmenter

    crops = []
    for name in ("market1501-mini", "cuhk03-mini"):
        folder = REAL / name / "Market-1501-v15.09.15" / "query"
        if folder.is_dir():
            crops += sorted(folder.glob("*.jpg"))[:8]
    if not crops:
        pytest.skip("no real crops")
    segment = PersonSegmenter()
    found = [segment(np.asarray(Image.open(p).convert("RGB"))) for p in crops]
    masks = [m > 0.5 for m in found if m is not None]
    assert len(masks) >= 0.85 * len(crops), f"a person in {len(masks)} of {len(crops)} crops"
    for m in masks:
        w = m.shape[1]
        assert 0.15 < m.mean() < 0.8
        assert m[:, w // 3: 2 * w // 3].mean() > m[:, : w // 4].mean()  # centred


def _binary_copy(masks_dir, out):
    """The embedded set's anti-aliased masks thresholded at 0.5, as a mask folder."""
    for png in masks_dir.glob("*/*.png"):
        dest = out / png.parent.name / png.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.where(np.asarray(Image.open(png)) > 127, 255, 0).astype(np.uint8)) \
            .save(dest)
    (out / MANIFEST).write_text(json.dumps({"format": 1, "no_person": []}))
    return out


def test_evaluate_scores_attention_against_a_mask_folder(tmp_path, capsys):
    """``evaluate --person-masks``: on the embedded target, a mask folder of its own masks gives
    the scores the embedded set's masks give (same pixels above 0.5), in the report, on stdout
    and as a fifth column of the figure; a folder of anti-aliased masks is refused in one
    line naming the file."""
    from edaan_fast.data import build_dataset, render
    from edaan_fast.engine.checkpoint import model_from_checkpoint
    from edaan_fast.evaluate import main as evaluate_main
    from edaan_fast.evaluation.evaluator import evaluate_attention

    from .test_evaluate_cli import _save

    render(None, "tiny", seed=0)
    ckpt = _save(tmp_path / "ckpt.pt", None)
    target = build_dataset("synthetic", domain="target", preset="tiny", seed=0)
    folder = _binary_copy(target.root / "masks", tmp_path / "masks")
    status = evaluate_main(["--checkpoint", str(ckpt), "--person-masks", str(folder),
                            "--output", str(tmp_path / "r.json"), "--num-workers", "0", "-q"])
    assert status == 0
    report = json.loads((tmp_path / "r.json").read_text())
    got = report["attention_quality"]
    assert got["net"] == "A_T" and got["images"] == 200
    assert "attention A_T against" in capsys.readouterr().out
    model, _ = model_from_checkpoint(str(ckpt))
    records = target.query + target.gallery
    want = evaluate_attention(model, {"A_T": records}, image_size=(64, 32))["A_T"]
    for field in ("auc", "iou", "position_auc", "mean"):
        assert got[field] == pytest.approx(getattr(want, field), abs=5e-3), field
    # the embedded set's own masks are anti-aliased: not a binary mask folder
    soft = target.root / "masks"
    (tmp_path / "soft_folder").mkdir()
    for sub in soft.iterdir():
        (tmp_path / "soft_folder" / sub.name).symlink_to(sub, target_is_directory=True)
    (tmp_path / "soft_folder" / MANIFEST).write_text(json.dumps({"format": 1}))
    status = evaluate_main(["--checkpoint", str(ckpt), "--person-masks",
                            str(tmp_path / "soft_folder"), "--num-workers", "0", "-q"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "is not binary" in err
