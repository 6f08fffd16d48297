"""``python -m edaan_fast.translate``: a data set translated into the Market-1501 layout with
the source file names (read back by our reader), pixels and masks equal to the model's
translation, resuming, the two-stage variants' translator and translated set (one writer),
and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edaan_fast.data import build_dataset, market1501
from edaan_fast.data.market_layout import SPLIT_DIRS
from edaan_fast.data.transforms import AugmentConfig, build_transform, decode_file, to_unit_range
from edaan_fast.data.translated import write_translated_set
from edaan_fast.engine.checkpoint import model_from_checkpoint
from edaan_fast.translate import main
from tests.conftest import requires_ops
from tests.oracles import market_mini
from tests.test_evaluate_cli import _save, synthetic_cache  # noqa: F401  (fixture)
from tests.test_export import _two_stage

pytestmark = requires_ops
ERROR_PREFIX = "python -m edaan_fast.translate: error: "


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, synthetic_cache):  # noqa: F811
    return _save(tmp_path_factory.mktemp("tr") / "ckpt.pt", None, seed=2)


@pytest.fixture(scope="module")
def source():
    return build_dataset("synthetic", domain="source", preset="tiny", seed=0)


def _translate(ckpt, out, *flags):
    assert main(["--checkpoint", str(ckpt), "--output-dir", str(out), "--num-workers", "0",
                 "-q", *flags]) == 0
    return json.loads((out / "translation.json").read_text())


def _expected(model, records, direction="s2t"):
    """The model's translation (uint8 pixels) and attention map (uint8) of each image, one at
    a time: an independent run of eq. (1)/(2) on the evaluation's preprocessing."""
    transform = build_transform(AugmentConfig(*model.config.image_size, train=False))
    x = torch.stack([transform(decode_file(r.path)) for r in records])
    with torch.no_grad():
        out = (model.s2t if direction == "s2t" else model.t2s)(x)
    pixels = to_unit_range(out.image, model.config.pixel_mean, model.config.pixel_std)
    pixels = pixels.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    maps = None
    if out.attention is not None:
        maps = out.attention.clamp(0, 1).mul(255).round().to(torch.uint8)[:, 0].numpy()
    return pixels, maps


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to a rounding step on a few pixels (batches of another size)."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_all_splits_in_market_layout_with_masks(ckpt, source, tmp_path):
    out = tmp_path / "out"
    summary = _translate(ckpt, out, "--splits", "all", "--image-format", "png",
                         "--save-masks", "--batch-size", "40")
    assert summary["complete"] and summary["direction"] == "s2t"
    assert {k: v["written"] for k, v in summary["splits"].items()} == {
        "train": len(source.train), "query": len(source.query), "gallery": len(source.gallery)}
    back = market1501(out)  # our reader takes it as is
    model, _ = model_from_checkpoint(ckpt)
    for split in ("train", "query", "gallery"):
        src, got = getattr(source, split), getattr(back, split)
        assert [Path(r.path).stem for r in got] == [Path(r.path).stem for r in src]
        assert [(r.pid, r.camid) for r in got] == [(r.pid, r.camid) for r in src]
        assert all(r.path.endswith(".png") for r in got)
    picks = source.query[:12]
    pixels, maps = _expected(model, picks)
    for k, r in enumerate(picks):
        name = Path(r.path).stem + ".png"
        written = np.array(Image.open(out / "query" / name))
        assert written.shape == (*model.config.image_size, 3)
        _close(written, pixels[k])
        _close(np.array(Image.open(out / "masks" / "query" / name)), maps[k])
    # the translation is not the input: the generator changed the pictures
    original = np.array(Image.open(picks[0].path).convert("RGB").resize((32, 64)))
    assert np.abs(original.astype(int) - pixels[0].astype(int)).mean() > 5


def test_resumes_skipping_finished_files(ckpt, source, tmp_path):
    out = tmp_path / "out"
    _translate(ckpt, out, "--image-format", "png")
    files = sorted((out / SPLIT_DIRS["train"]).glob("*.png"))
    assert len(files) == len(source.train)
    before = {f: f.read_bytes() for f in files[:4]}
    for f in files[:3]:
        f.unlink()
    sentinel = files[10]
    Image.new("RGB", (32, 64), (1, 2, 3)).save(sentinel)
    summary = _translate(ckpt, out, "--image-format", "png")
    assert summary["splits"]["train"]["written"] == 3
    for f, data in before.items():
        assert f.read_bytes() == data
    assert np.array(Image.open(sentinel))[0, 0].tolist() == [1, 2, 3]  # left alone


def test_default_keeps_the_jpeg_names_and_t2s_reads_the_target(ckpt, tmp_path):
    out = tmp_path / "t2s"
    summary = _translate(ckpt, out, "--direction", "t2s")
    target = build_dataset("synthetic", domain="target", preset="tiny", seed=0)
    assert summary["dataset"] == "synthetic-target"
    names = sorted(p.name for p in (out / "bounding_box_train").iterdir())
    assert names == sorted(Path(r.path).name for r in target.train)
    assert all(n.endswith(".jpg") for n in names)
    model, _ = model_from_checkpoint(ckpt)
    pixels, _ = _expected(model, target.train[:4], "t2s")
    for k, r in enumerate(target.train[:4]):
        jpeg = np.array(Image.open(out / "bounding_box_train" / Path(r.path).name))
        # JPEG quality 95 of an untrained (noisy) generator's output: a few levels off, while
        # another image's translation is much further away
        assert np.abs(jpeg.astype(int) - pixels[k].astype(int)).mean() < 5
        assert np.abs(jpeg.astype(int) - pixels[(k + 1) % 4].astype(int)).mean() > 10


def test_amp_is_close_to_float32(ckpt, tmp_path):
    a = tmp_path / "fp32"
    b = tmp_path / "amp"
    _translate(ckpt, a, "--image-format", "png")
    _translate(ckpt, b, "--image-format", "png", "--amp")
    files = sorted(a.joinpath("bounding_box_train").glob("*.png"))[:20]
    diffs = [np.abs(np.array(Image.open(f)).astype(int)
                    - np.array(Image.open(b / "bounding_box_train" / f.name)).astype(int))
             for f in files]
    assert 0 < np.mean([d.mean() for d in diffs]) < 4


def test_two_stage_run_translates_with_its_translator_and_one_writer(source, tmp_path):
    run = tmp_path / "daan"
    final, _ = _two_stage(run / "final.pt", stage=1, seed=0)
    _, trained = _two_stage(run / "translator.pt", stage=None, seed=1)
    out = tmp_path / "out"
    _translate(final, out, "--image-format", "png")
    records = source.train[:30]
    folder = write_translated_set(trained.eval(), records, tmp_path / "translated",
                                  image_size=trained.config.image_size, batch_size=64)
    assert sorted(Path(r.path).name for r in folder) == [f"{i:06d}.png" for i in range(30)]
    for i, r in enumerate(records):  # the same pixels from the trainer's writer
        ours = np.array(Image.open(out / "bounding_box_train" / (Path(r.path).stem + ".png")))
        _close(ours, np.array(Image.open(folder[i].path)))
    pixels, _ = _expected(trained, records[:3])
    _close(np.array(Image.open(folder[0].path)), pixels[0])


def test_real_market_images_keep_their_names(ckpt, tmp_path):
    root = market_mini()
    if root is None:
        pytest.skip("no Market-1501 subset on this machine")
    out = tmp_path / "market"
    summary = _translate(ckpt, out, "--dataset", "market1501", "--data-root", str(root),
                         "--batch-size", "128")
    src = market1501(root)
    assert summary["dataset"] == "market1501" and summary["splits"]["train"]["written"] == len(
        src.train)
    names = sorted(p.name for p in (out / "bounding_box_train").iterdir())
    assert names == sorted(Path(r.path).name for r in src.train)


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(ERROR_PREFIX) and err.count("\n") == 1, err
    return err[len(ERROR_PREFIX):]


def test_errors(ckpt, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "does not exist" in _error(capsys, ["--checkpoint", str(tmp_path / "no.pt"),
                                               "--output-dir", out])
    direct = _save(tmp_path / "direct.pt", None, variant="direct")
    assert "has no translator" in _error(capsys, ["--checkpoint", str(direct), "--output-dir",
                                                  out])
    noattn = _save(tmp_path / "noattn.pt", None, no_attention=True)
    msg = _error(capsys, ["--checkpoint", str(noattn), "--output-dir", out, "--save-masks"])
    assert "--save-masks" in msg and "without attention" in msg
    msg = _error(capsys, ["--checkpoint", str(ckpt), "--output-dir", out, "--dataset",
                          "market1501", "--data-root", str(tmp_path / "nowhere")])
    assert "data set root does not exist" in msg and "nowhere" in msg
    msg = _error(capsys, ["--checkpoint", str(ckpt), "--output-dir", out, "--dataset",
                          "market1501"])
    assert "--dataset market1501 needs --data-root" in msg
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    msg = _error(capsys, ["--checkpoint", str(ckpt), "--output-dir", str(busy)])
    assert "is not empty and holds no translation" in msg
    assert (busy / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    msg = _error(capsys, ["--checkpoint", str(ckpt), "--output-dir", str(tmp_path / "file")])
    assert "is a file" in msg
    msg = _error(capsys, ["--checkpoint", str(ckpt), "--output-dir", out, "--batch-size", "0"])
    assert "--batch-size must be >= 1, got 0" in msg


def test_process_reports_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edaan_fast.translate", "--checkpoint",
                           str(tmp_path / "missing.pt"), "--output-dir", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"{ERROR_PREFIX}checkpoint {tmp_path / 'missing.pt'} does not exist"]
