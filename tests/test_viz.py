"""Figures: valid PNGs of the documented pixel size; rank-list frame colours follow the matches."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("matplotlib")

from edaan_fast.viz import (
    plot_attention,
    plot_rank_list,
    plot_translations,
    plot_tsne,
    rank_list_for_query,
)
from edaan_fast.viz._canvas import GREEN, RED
from edaan_fast.viz.rank_list import cell_origin

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = Image.open(path)
    img.verify()
    return np.asarray(Image.open(path).convert("RGB"))


def _frame_color(px, i, size=(128, 64), frame=4, label_height=20):
    y, x = cell_origin(i, size, frame, label_height)
    return tuple(int(c) for c in px[y + frame // 2, x + frame // 2])


def test_import_ops_does_not_import_matplotlib():
    code = (
        "import sys, edaan_fast.ops, edaan_fast.viz, edaan_fast.metrics.protocols; "
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_rank_list_frames_follow_matches(tmp_path):
    rng = np.random.default_rng(0)
    # paths, arrays and tensors mixed, different sizes (resized)
    paths = []
    for i in range(3):
        p = tmp_path / f"g{i}.png"
        Image.fromarray(rng.integers(0, 255, (100, 50, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    gallery = (
        paths
        + [rng.random((128, 64, 3)) for _ in range(4)]
        + [torch.rand(3, 64, 32) for _ in range(3)]
    )
    matches = [True, False, False, True, False, True, True, False, False, True]
    out = plot_rank_list(paths[0], gallery, matches, tmp_path / "ranks.png")
    px = _png(out)
    assert px.shape == (20 + 128 + 8, 11 * 72 + 16 + 4 * 9, 3)
    for r, ok in enumerate(matches, start=1):
        assert _frame_color(px, r) == (GREEN if ok else RED), f"rank {r}"
    assert _frame_color(px, 0) not in (GREEN, RED)


def test_rank_list_for_query_drops_junk_and_ranks(tmp_path):
    g_pids = np.array([5, 1, 5, 2, 5, 3])
    g_cams = np.array([0, 1, 1, 1, 0, 1])
    dist = np.array([0.0, 0.5, 0.2, 0.1, 0.3, 0.9])  # item 0 and 4: same pid & cam -> junk
    imgs = [np.full((16, 8, 3), 40 * i, np.uint8) for i in range(6)]
    out = rank_list_for_query(
        dist, 5, 0, g_pids, g_cams, imgs[0], imgs, tmp_path / "q.png", topk=3, size=(32, 16)
    )
    px = _png(out)
    # ranked: item 3 (0.1, pid 2) red, item 2 (0.2, pid 5) green, item 1 (0.5) red
    colors = [_frame_color(px, i, size=(32, 16)) for i in (1, 2, 3)]
    assert colors == [RED, GREEN, RED]
    assert px.shape[1] == 4 * 24 + 16 + 4 * 2


def test_rank_list_rejects_mismatched_flags(tmp_path):
    with pytest.raises(ValueError, match="3 gallery images but 2 match flags"):
        plot_rank_list(
            np.zeros((8, 4, 3)), [np.zeros((8, 4, 3))] * 3, [True, False], tmp_path / "x.png"
        )


def test_attention_grid(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 64, 32, generator=g) * 2 - 1
    masks = torch.zeros(3, 1, 64, 32)
    masks[:, :, 16:48, 8:24] = 1.0  # the "person" in the middle
    px = _png(plot_attention(images, masks, tmp_path / "attn.png"))
    assert px.shape == (20 + 3 * 64 + 2 * 4, 4 * 32 + 3 * 4, 3)
    row0 = px[20:84]
    fg, bg = row0[:, 2 * 36 : 2 * 36 + 32], row0[:, 3 * 36 : 3 * 36 + 32]
    assert (fg[:8] == 0).all() and (bg[16:48, 8:24] == 0).all()  # hidden parts are black
    assert (row0[:, 36 : 36 + 32][30, 16] == 255).all()  # mask = 1 shows white
    with pytest.raises(ValueError, match="masks must be"):
        plot_attention(images, masks[:2], tmp_path / "bad.png")


def test_attention_figure_with_true_person(tmp_path):
    images = torch.rand(2, 3, 64, 32)
    masks = torch.rand(2, 1, 64, 32)
    truth = torch.zeros(2, 1, 64, 32)
    truth[:, :, 16:48, 8:24] = 1.0
    px = _png(plot_attention(images, masks, tmp_path / "attn.png", truth=truth))
    assert px.shape == (20 + 2 * 64 + 4, 5 * 32 + 4 * 4, 3)
    fifth = px[20:84, 4 * 36 : 4 * 36 + 32]
    assert (fifth[30, 16] == 255).all() and (fifth[5, 2] == 0).all()  # the true person, white
    with pytest.raises(ValueError, match="truth must be"):
        plot_attention(images, masks, tmp_path / "bad.png", truth=truth[:1])


def test_translation_grid(tmp_path):
    src, ed, na = (torch.rand(4, 3, 32, 16) for _ in range(3))
    px = _png(plot_translations(src, ed, na, tmp_path / "tr.png"))
    assert px.shape == (20 + 4 * 32 + 3 * 4, 3 * 16 + 2 * 4, 3)
    # column 1 row 2 holds EDAAN's third image
    expected = np.rint(ed[2].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(px[20 + 2 * 36 : 20 + 2 * 36 + 32, 20:36], expected)


def test_tsne_plot(tmp_path):
    rng = np.random.default_rng(0)
    pids = np.repeat(np.arange(12), 5)
    emb = rng.normal(size=(12, 8))[pids] * 5 + rng.normal(size=(60, 8))
    domains = np.tile([0, 1], 30)
    path, keep = plot_tsne(
        emb,
        pids,
        tmp_path / "tsne.png",
        domains=domains,
        domain_names={0: "target", 1: "translated"},
        size_px=(400, 300),
        perplexity=10,
    )
    px = _png(path)
    assert px.shape == (300, 400, 3)
    assert keep.sum() == 50 and set(pids[keep]) == set(range(10))  # at most 10 identities
    assert len({tuple(c) for c in px.reshape(-1, 3)[::7]}) > 10  # coloured points drawn
