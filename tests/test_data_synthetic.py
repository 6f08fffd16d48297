"""The embedded synthetic two-domain set: determinism, layout, masks, domain gap, cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edaan_fast.data import DatasetError, SyntheticPreset, build_dataset, load_mask, render
from edaan_fast.data.synthetic import PRESETS, default_cache_root

MICRO = SyntheticPreset("micro", 32, 16, num_train_ids=4, num_test_ids=3, num_cams=2,
                        images_per_cam=2, num_distractors=1)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".complete.json"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    folder = render(root, "tiny", seed=0)
    return root, folder


def test_tiny_renders_complete(tiny):
    # its render time is a benchmark (benchmarks/bench_synthetic.py), not a unit test
    _, folder = tiny
    marker = json.loads((folder / ".complete.json").read_text())
    assert marker["preset"]["name"] == "tiny" and marker["counts"]["source"] > 200


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = tree_bytes(render(tmp_path / "a", MICRO, seed=5))
    b = tree_bytes(render(tmp_path / "b", MICRO, seed=5))
    c = tree_bytes(render(tmp_path / "c", MICRO, seed=6))
    assert a and a == b
    assert a.keys() == c.keys()  # same plan shape...
    changed = [k for k in a if k.endswith(".jpg") and a[k] != c[k]]
    assert len(changed) == sum(k.endswith(".jpg") for k in a)  # ...but every image differs


def test_parallel_render_gives_the_same_bytes(tmp_path, monkeypatch):
    from edaan_fast.data import synthetic

    serial = tree_bytes(render(tmp_path / "serial", MICRO, seed=4, workers=1))
    monkeypatch.setattr(synthetic, "RENDER_CHUNK", 5)  # several chunks over 2 processes
    parallel = tree_bytes(render(tmp_path / "parallel", MICRO, seed=4, workers=2))
    assert serial == parallel and len(serial) > 20


@pytest.mark.parametrize("domain", ["source", "target"])
def test_layout_read_by_market_reader(tiny, domain):
    root, folder = tiny
    preset = PRESETS["tiny"]
    ds = build_dataset("synthetic", root, domain=domain, preset="tiny", seed=0)
    same = build_dataset("market1501", folder / domain)
    assert [r.path for r in ds.train] == [r.path for r in same.train]
    assert ds.num_train_pids == preset.num_train_ids
    assert ds.num_train_cams == preset.num_cams
    test_ids = {r.pid for r in ds.query}
    assert len(test_ids) == preset.num_test_ids and test_ids <= {r.pid for r in ds.gallery}
    assert sum(r.pid == 0 for r in ds.gallery) == preset.num_distractors
    # one query per (identity, camera), each with a positive from another camera
    assert len(ds.query) == len({(r.pid, r.camid) for r in ds.query})
    for q in ds.query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in ds.gallery)
    with Image.open(ds.train[0].path) as img:
        assert img.size == (preset.width, preset.height) and img.mode == "RGB"


def _pixels(folder: Path, domain: str):
    fg, bg = [], []
    for path in sorted((folder / domain / "bounding_box_train").glob("*.jpg")):
        img = np.asarray(Image.open(path), dtype=np.float32)
        mask = load_mask(path)
        assert mask.shape == img.shape[:2]
        fg.append(img[mask > 0.95])
        bg.append(img[mask < 0.05])
    return np.concatenate(fg), np.concatenate(bg)


def test_masks_and_domain_gap(tiny):
    _, folder = tiny
    fg_s, bg_s = _pixels(folder, "source")
    fg_t, bg_t = _pixels(folder, "target")
    bg_gap = np.linalg.norm(bg_s.mean(0) - bg_t.mean(0))
    fg_gap = np.linalg.norm(fg_s.mean(0) - fg_t.mean(0))
    # the domains differ in the background far more than in the people's colours
    assert bg_gap > 4 * fg_gap, (bg_gap, fg_gap)
    # and the target background is far more textured: neighbouring pixels differ more
    assert _background_texture(folder, "target") > 2 * _background_texture(folder, "source")


def test_only_the_people_wear_vivid_colours(tiny):
    """The backgrounds differ in tone and structure but hold nothing coloured like clothing,
    which a discriminator would accept as a person (version 3's target columns did)."""
    _, folder = tiny
    for domain in ("source", "target"):
        fg, bg = _pixels(folder, domain)
        vivid_fg, vivid_bg = _vivid(fg).mean(), _vivid(bg).mean()
        assert vivid_fg > 0.25 and vivid_bg < 0.03, (domain, vivid_fg, vivid_bg)


def _vivid(rgb: np.ndarray) -> np.ndarray:
    """Saturation above 0.5 at a value above 0.3 (HSV) -- clothing colours."""
    top, bottom = rgb.max(1) / 255, rgb.min(1) / 255
    return ((top - bottom) / np.maximum(top, 1e-3) > 0.5) & (top > 0.3)


def _background_texture(folder: Path, domain: str) -> float:
    """Mean absolute difference between horizontally adjacent background pixels."""
    diffs = []
    for path in sorted((folder / domain / "bounding_box_train").glob("*.jpg")):
        img = np.asarray(Image.open(path), dtype=np.float32)
        bg = load_mask(path) < 0.05
        step = np.abs(np.diff(img, axis=1)).mean(2)
        diffs.append(step[bg[:, 1:] & bg[:, :-1]])
    return float(np.concatenate(diffs).mean())


def test_mask_lands_on_the_person(tiny):
    _, folder = tiny
    paths = sorted((folder / "source" / "bounding_box_train").glob("*.jpg"))[:30]
    for path in paths:
        mask = load_mask(path)
        img = np.asarray(Image.open(path), dtype=np.float32)
        fg = mask > 0.5
        assert 0.08 < fg.mean() < 0.6  # a person, not the whole frame, not nothing
        rows = np.flatnonzero(fg.any(1))
        assert rows[-1] - rows[0] > 0.6 * mask.shape[0]  # head to feet
        # the mask outlines an edge of the image: colour changes across its boundary
        gy, gx = np.gradient(img.mean(2))
        grad = np.hypot(gy, gx)
        edge = (mask > 0.2) & (mask < 0.8)
        if edge.sum() < 5:
            edge = fg ^ np.roll(fg, 1, axis=1)
        assert grad[edge].mean() > grad[mask < 0.01].mean()
    assert np.array_equal(load_mask(paths[0]), load_mask(
        folder / "source" / "masks" / "bounding_box_train" / f"{paths[0].stem}.png"))


def test_load_mask_without_mask_is_an_error(tmp_path):
    img = tmp_path / "query" / "0001_c1s1_000001_00.jpg"
    img.parent.mkdir()
    Image.new("RGB", (4, 8)).save(img)
    with pytest.raises(DatasetError, match="no ground-truth mask"):
        load_mask(img)


def test_incomplete_cache_is_rendered_again(tmp_path):
    folder = render(tmp_path, MICRO, seed=1)
    victim = next((folder / "target" / "query").glob("*.jpg"))
    original = victim.read_bytes()
    victim.write_bytes(b"half written")
    assert render(tmp_path, MICRO, seed=1) == folder
    assert victim.read_bytes() == b"half written"  # complete cache: reused as is
    (folder / ".complete.json").unlink()  # as if the render had been interrupted
    render(tmp_path, MICRO, seed=1)
    assert victim.read_bytes() == original
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folders left behind


def _render_micro(root):
    return str(render(root, MICRO, seed=3))


def test_processes_replacing_a_stale_cache_at_once_all_succeed(tmp_path):
    """Parallel runs that find an outdated cache each render it and replace it: none may fail
    (two of them removing the same stale folder used to crash one with FileNotFoundError)."""
    import multiprocessing as mp

    reference = tree_bytes(render(tmp_path / "reference", MICRO, seed=3))
    folder = render(tmp_path / "shared", MICRO, seed=3)
    marker = folder / ".complete.json"
    marker.write_text(marker.read_text().replace('"version": ', '"version": -'))  # outdated
    with mp.get_context("fork").Pool(4) as pool:
        results = pool.map(_render_micro, [tmp_path / "shared"] * 4)
    assert results == [str(folder)] * 4
    assert tree_bytes(folder) == reference
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [folder.name]  # nothing left over


def test_a_copy_installed_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch):
    """Between moving the stale folder aside and moving ours in, another process installs its
    complete copy: ours is discarded and theirs is kept, not an error."""
    from edaan_fast.data import base

    theirs = render(tmp_path / "theirs", MICRO, seed=2)
    folder = render(tmp_path / "ours", MICRO, seed=2)
    (folder / ".complete.json").unlink()  # stale: must be rendered again
    real_rmtree = base.shutil.rmtree

    def rmtree_then_other_process_wins(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        if Path(path).name.startswith(f".{folder.name}.old") and not folder.exists():
            shutil.copytree(theirs, folder)
            (folder / "theirs").touch()

    monkeypatch.setattr(base.shutil, "rmtree", rmtree_then_other_process_wins)
    assert render(tmp_path / "ours", MICRO, seed=2) == folder
    monkeypatch.undo()
    assert (folder / "theirs").exists() and (folder / ".complete.json").exists()
    assert [p.name for p in (tmp_path / "ours").iterdir()] == [folder.name]


def test_default_cache_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EDAAN_FAST_DATA", str(tmp_path / "cache"))
    assert default_cache_root() == tmp_path / "cache"
    ds = build_dataset("synthetic", domain="target", preset=MICRO, seed=2)
    assert Path(ds.train[0].path).is_relative_to(tmp_path / "cache" / "micro_seed2" / "target")


def test_bad_arguments():
    with pytest.raises(ValueError, match="choices: tiny, small, paper"):
        render("/nonexistent", "huge")
    with pytest.raises(ValueError, match="domain"):
        build_dataset("synthetic", "/nonexistent", domain="middle")
